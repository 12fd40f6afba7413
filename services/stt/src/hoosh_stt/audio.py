"""Read an upload with PyAV — faster-whisper's own decoder: FFmpeg's libraries inside
the ``av`` wheel, no ``ffmpeg`` program — in two passes, neither of which holds the
whole audio:

1. ``probe``: how long it plays, counted from the container's packets without
   decoding them (FFmpeg's parsers stamp every packet with its duration; ffprobe's
   ``-count_packets``), or, where a format leaves them unstamped, by decoding and
   counting samples without keeping them. What is not audio, holds no samples, is
   visibly cut short or runs past the duration limit is refused here, before
   anything is reserved or decoded.
2. ``windows``: 16 kHz mono float32 in windows of at most ``window_seconds``, each
   ended at the quietest moment of its last seconds, so a word is seldom cut in two.
   Memory is one window, whatever the file's length.

Any container FFmpeg reads works (wav, mp3, flac, ogg, webm, m4a...). Blocking: call
these from a worker thread.
"""

from __future__ import annotations

import gc
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import av
import av.error
import numpy as np

from .errors import AudioTooLong, AudioTooShort, InvalidAudio

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1  # OpenAI refuses shorter audio the same way
SUPPORTED = "flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, wav, webm"
_UNREADABLE = f"The audio file could not be decoded: it may be corrupted or in an unsupported format ({SUPPORTED})."
# A window ends at the quietest 20 ms of its last CUT_SEARCH_SECONDS (at most a quarter of it).
CUT_SEARCH_SECONDS = 5.0
_CUT_FRAME = SAMPLE_RATE // 50


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What ``probe`` found: the audio's length and FFmpeg's name of its container."""

    duration: float  # seconds
    container: str  # e.g. "wav", "ogg"


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    container: str  # FFmpeg's name of the container, e.g. "wav", "ogg"

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.samples) / SAMPLE_RATE


def wav_shortfall(data: bytes) -> int:
    """Bytes missing from a RIFF/WAVE file's ``data`` chunk (0 when complete or not a WAV).

    FFmpeg clamps a WAV's length to the bytes present, so a cut file would decode
    quietly; its header still says how long it should be. Streaming writers put
    0 or 0xFFFFFFFF there (unknown length): those are never called short.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        size: int
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"data":
            if size in (0, 0xFFFFFFFF):
                return 0
            return max(0, size - (len(data) - body))
        offset = body + size + (size & 1)  # chunks are word aligned
    return 0


def _declared_seconds(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float | None:
    """The duration the container's header states, when it states one exactly."""
    if "mp3" in container.format.name:
        return None  # without a Xing header FFmpeg estimates it from the bitrate
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _too_long(seconds: float | None, max_seconds: float) -> AudioTooLong:
    if seconds is None:
        return AudioTooLong(f"The audio is longer than the maximum of {max_seconds:.0f} seconds.")
    return AudioTooLong(f"The audio is {seconds:.0f} seconds long; the maximum is {max_seconds:.0f} seconds.")


def _check_bytes(data: bytes) -> None:
    if not data:
        raise InvalidAudio("The audio file is empty.")
    missing = wav_shortfall(data)
    if missing > 0:
        raise InvalidAudio(f"The audio file is truncated: its WAV header declares {missing} more bytes than it holds.")


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    if not container.streams.audio:
        raise InvalidAudio("The file holds no audio stream.")
    return container.streams.audio[0]


def _packet_seconds(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, max_seconds: float
) -> float | None:
    """Seconds the stream's packets cover, read without decoding; None when a packet
    carries no duration (then only decoding can tell)."""
    if stream.time_base is None:
        return None
    limit = max_seconds / stream.time_base  # in the stream's time base, exact
    total = 0
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the flush packet demux ends with
        if not packet.duration or packet.duration < 0:
            return None
        total += packet.duration
        if total > limit:
            raise _too_long(None, max_seconds)
    return float(total * stream.time_base)


def _counted_seconds(data: bytes, max_seconds: float) -> float:
    """Seconds of audio, by decoding and counting samples; no sample is kept."""
    total = 0.0
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        frames = container.decode(_audio_stream(container))
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.InvalidDataError:
                continue  # one bad packet: skip it, as the decoding does
            total += frame.samples / frame.sample_rate
            if total > max_seconds:
                raise _too_long(None, max_seconds)
    return total


def probe(data: bytes, max_seconds: float) -> AudioInfo:
    """How long ``data`` plays, found without holding its samples.

    Raises ``InvalidAudio`` (empty, not audio, cut short), ``AudioTooShort`` (under
    ``MIN_SECONDS``) or ``AudioTooLong`` (over ``max_seconds``: refused as soon as the
    header or the packets counted so far say so, before any decoding).
    """
    _check_bytes(data)
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            stream = _audio_stream(container)
            container_name = container.format.name
            declared = _declared_seconds(container, stream)
            if declared is not None and declared > max_seconds:
                raise _too_long(declared, max_seconds)
            seconds = _packet_seconds(container, stream, max_seconds)
        if seconds is None:
            seconds = _counted_seconds(data, max_seconds)
    except av.error.FFmpegError as exc:
        raise InvalidAudio(_UNREADABLE) from exc
    if seconds < MIN_SECONDS:
        raise AudioTooShort(
            f"The audio file is too short ({seconds:.2f} s). Minimum audio length is {MIN_SECONDS} seconds."
        )
    # Formats that state their length exactly (flac, mp4/m4a, webm) betray a cut file.
    if declared is not None and seconds < declared - max(1.0, 0.1 * declared):
        raise InvalidAudio(
            f"The audio file is truncated: its header declares {declared:.2f} s but it holds {seconds:.2f} s."
        )
    return AudioInfo(seconds, container_name)


def _cut(samples: np.ndarray, window: int, search: int) -> int:
    """Where to end a window: the middle of the quietest 20 ms among the last ``search``
    samples before ``window`` (the latest one, when several are equally quiet)."""
    frames = search // _CUT_FRAME
    if frames < 2:
        return window
    region = samples[window - frames * _CUT_FRAME : window].astype(np.float32)
    energy = np.square(region.reshape(frames, _CUT_FRAME)).sum(axis=1)
    quietest = frames - 1 - int(np.argmin(energy[::-1]))
    return window - frames * _CUT_FRAME + quietest * _CUT_FRAME + _CUT_FRAME // 2


def windows(data: bytes, window_seconds: float, max_seconds: float) -> Iterator[np.ndarray]:
    """Decode ``data`` to 16 kHz mono float32, yielded in windows of at most
    ``window_seconds``; consecutive windows join without gap or overlap.

    Holds one window (int16 while it fills, float32 once yielded) and one decoded
    frame, never the whole audio. Raises ``InvalidAudio`` when nothing decodes,
    ``AudioTooShort`` and ``AudioTooLong`` as ``probe`` does (a file whose packets
    understate its length is stopped at ``max_seconds``). Close the generator when
    stopping early: it holds the decoder.
    """
    _check_bytes(data)
    window = max(1, int(window_seconds * SAMPLE_RATE))
    search = min(int(CUT_SEARCH_SECONDS * SAMPLE_RATE), window // 4)
    max_samples = int(max_seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    buffered = 0
    total = 0
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    try:
        try:
            with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
                frames = container.decode(_audio_stream(container))
                flushed = False
                while not flushed:
                    try:
                        frame = next(frames)
                    except StopIteration:
                        frame, flushed = None, True
                    except av.error.InvalidDataError:
                        continue  # one bad packet: skip it, as faster-whisper does
                    if frame is not None:
                        frame.pts = None  # the resampler must not try to fill gaps in timestamps
                    for out in resampler.resample(frame):  # None: flush
                        array = out.to_ndarray().reshape(-1)
                        pieces.append(array)
                        buffered += len(array)
                        total += len(array)
                    if total > max_samples:
                        raise _too_long(None, max_seconds)
                    while buffered > window:
                        joined = np.concatenate(pieces)
                        end = _cut(joined, window, search)
                        rest = joined[end:].copy()
                        pieces, buffered = [rest], len(rest)
                        yield joined[:end].astype(np.float32) / 32768.0
                        del joined
        except av.error.FFmpegError as exc:
            raise InvalidAudio(_UNREADABLE) from exc
        if total < MIN_SECONDS * SAMPLE_RATE:
            raise AudioTooShort(
                f"The audio file is too short ({total / SAMPLE_RATE:.2f} s). "
                f"Minimum audio length is {MIN_SECONDS} seconds."
            )
        if buffered:
            yield np.concatenate(pieces).astype(np.float32) / 32768.0
    finally:
        # PyAV's resampler graph is freed only by a collection (faster-whisper does the same).
        pieces.clear()
        del resampler
        gc.collect()


def decode(data: bytes, max_seconds: float) -> DecodedAudio:
    """The whole audio in one array, after ``probe``'s checks (its errors). For short
    clips and tools: the service itself transcribes ``windows``."""
    info = probe(data, max_seconds)
    parts = list(windows(data, window_seconds=max_seconds + 1.0, max_seconds=max_seconds))
    samples = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return DecodedAudio(samples, info.container)
