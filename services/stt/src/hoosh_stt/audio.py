"""Decode an upload into 16 kHz mono float32 samples with PyAV — faster-whisper's own
decoder: FFmpeg's libraries inside the ``av`` wheel, no ``ffmpeg`` program.

Any container FFmpeg reads works (wav, mp3, flac, ogg, webm, m4a...). What is not
audio, holds no samples, or is visibly cut short is refused with ``InvalidAudio``
before anything is charged. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import gc
import io
import struct
from dataclasses import dataclass

import av
import av.error
import numpy as np

from .errors import AudioTooLarge, AudioTooShort, InvalidAudio

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1  # OpenAI refuses shorter audio the same way
SUPPORTED = "flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, wav, webm"
_UNREADABLE = f"The audio file could not be decoded: it may be corrupted or in an unsupported format ({SUPPORTED})."


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


def decode(data: bytes, max_seconds: float) -> DecodedAudio:
    """Decode ``data``; raises ``InvalidAudio``, ``AudioTooShort`` or ``AudioTooLarge``."""
    if not data:
        raise InvalidAudio("The audio file is empty.")
    missing = wav_shortfall(data)
    if missing > 0:
        raise InvalidAudio(f"The audio file is truncated: its WAV header declares {missing} more bytes than it holds.")
    max_samples = int(max_seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    total = 0
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidAudio("The file holds no audio stream.")
            stream = container.streams.audio[0]
            container_name = container.format.name
            declared = _declared_seconds(container, stream)
            if declared is not None and declared > max_seconds:
                raise AudioTooLarge(f"The audio is {declared:.0f} s long; the limit is {max_seconds:.0f} s.")
            frames = container.decode(stream)
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except av.error.InvalidDataError:
                    continue  # one bad packet: skip it, as faster-whisper does
                frame.pts = None  # the resampler must not try to fill gaps in timestamps
                for out in resampler.resample(frame):
                    array = out.to_ndarray().reshape(-1)
                    pieces.append(array)
                    total += len(array)
                if total > max_samples:
                    raise AudioTooLarge(f"The audio is longer than the limit of {max_seconds:.0f} s.")
            for out in resampler.resample(None):  # flush
                pieces.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise InvalidAudio(_UNREADABLE) from exc
    finally:
        # PyAV's resampler graph is freed only by a collection (faster-whisper does the same).
        del resampler
        gc.collect()
    samples = (np.concatenate(pieces) if pieces else np.zeros(0, np.int16)).astype(np.float32) / 32768.0
    audio = DecodedAudio(samples, container_name)
    if audio.duration < MIN_SECONDS:
        raise AudioTooShort(
            f"The audio file is too short ({audio.duration:.2f} s). Minimum audio length is {MIN_SECONDS} seconds."
        )
    # Formats that state their length exactly (flac, mp4/m4a, webm) betray a cut file.
    if declared is not None and audio.duration < declared - max(1.0, 0.1 * declared):
        raise InvalidAudio(
            f"The audio file is truncated: its header declares {declared:.2f} s but it holds {audio.duration:.2f} s."
        )
    return audio
