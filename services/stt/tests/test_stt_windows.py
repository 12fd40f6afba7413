"""Long audio without holding it: the probe (duration from the packets, refusals
before decoding), the windowed decoder, and the joining of the windows' transcripts.
No model here: a stand-in engine records what it is handed."""

from __future__ import annotations

import io
import threading
import wave
from collections.abc import Iterator

import numpy as np
import pytest
from hoosh_stt import audio as audio_module
from hoosh_stt.audio import SAMPLE_RATE, decode, probe, windows
from hoosh_stt.engine import Segment, TranscribeParams, Transcript, TranscriptJoiner, Word
from hoosh_stt.errors import AudioTooLong, ClientCancelled, InvalidAudio
from hoosh_stt.transcription import transcribe_windows

from .conftest import encode, silent_mp3
from .test_stt_engine import CONTAINERS, as_container


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_probe_counts_the_packets_to_the_decoded_length(speech: bytes, container: str) -> None:
    data = as_container(speech, container)
    info = probe(data, max_seconds=60)
    # The packets count the codec's padding and the resampler rounds: a few ms apart.
    assert abs(info.duration - decode(data, max_seconds=60).duration) < 0.1
    assert info.container


def test_probe_without_packet_durations_counts_decoded_samples(speech: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    data = as_container(speech, "ogg")
    expected = probe(data, max_seconds=60).duration
    monkeypatch.setattr(audio_module, "_packet_seconds", lambda *args: None)
    assert probe(data, max_seconds=60).duration == pytest.approx(expected, abs=0.02)
    with pytest.raises(AudioTooLong):
        probe(data, max_seconds=1.0)


def test_a_long_file_is_refused_by_the_probe_from_its_packets_alone() -> None:
    hour = silent_mp3(60)
    assert probe(hour, max_seconds=7200).duration == pytest.approx(3600, rel=0.01)
    with pytest.raises(AudioTooLong, match="maximum of 1800 seconds") as raised:
        probe(hour, max_seconds=1800)
    assert (raised.value.error_code, raised.value.http_status, raised.value.param) == ("audio_too_long", 400, "file")


def test_bad_audio_is_refused_by_the_probe(speech: bytes) -> None:
    with pytest.raises(InvalidAudio, match="could not be decoded"):
        probe(b"not audio " * 100, max_seconds=60)
    with pytest.raises(InvalidAudio, match="truncated"):
        probe(encode(speech, "flac", "flac")[:20_000], max_seconds=60)


def test_windows_are_bounded_and_join_to_the_whole_audio(speech: bytes) -> None:
    # Three sentences with a second of silence between them: cuts belong in the pauses.
    whole = decode(speech, max_seconds=60).samples
    pause = np.zeros(SAMPLE_RATE, dtype=np.float32)
    joined = np.concatenate([whole, pause, whole, pause, whole])
    wav = encode_pcm(joined)
    window_seconds = 4.0
    parts = list(windows(wav, window_seconds=window_seconds, max_seconds=60))
    assert len(parts) >= 3
    assert all(part.dtype == np.float32 and 0 < len(part) <= window_seconds * SAMPLE_RATE for part in parts)
    assert np.array_equal(np.concatenate(parts), decode(wav, max_seconds=60).samples)
    # Each cut lies at the quietest point of the window's end (here: digital silence).
    for part in parts[:-1]:
        assert np.abs(part[-80:]).max() < 0.01


def test_windows_stop_at_the_duration_limit_whatever_the_packets_said() -> None:
    with pytest.raises(AudioTooLong):
        for _ in windows(silent_mp3(3), window_seconds=30, max_seconds=100):
            pass


def test_an_abandoned_window_generator_frees_its_decoder() -> None:
    generator = windows(silent_mp3(2), window_seconds=30, max_seconds=600)
    first = next(generator)
    assert len(first) <= 30 * SAMPLE_RATE
    generator.close()  # no error, the container and resampler are released


def encode_pcm(samples: np.ndarray) -> bytes:
    """16 kHz mono float32 samples as a 16-bit WAV."""
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setnchannels(1)
        target.setsampwidth(2)
        target.setframerate(SAMPLE_RATE)
        target.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


class RecordingEngine:
    """An engine that answers each window with one segment of one word and keeps the
    parameters it was called with."""

    name = "recording"

    def __init__(self, language: str = "de", silent_windows: int = 0) -> None:
        self.calls: list[tuple[int, TranscribeParams]] = []
        self._language = language
        self._silent = silent_windows

    def transcribe(self, model: str, audio: np.ndarray, params: TranscribeParams) -> Transcript:
        index = len(self.calls)
        self.calls.append((len(audio), params))
        if index < self._silent:
            return Transcript(text="", language="en", segments=())
        segment = Segment(id=0, seek=50, start=0.5, end=1.5, text=f" word{index}", tokens=(index,))
        return Transcript(
            text=f"word{index}",
            language=self._language,
            segments=(segment,),
            words=(Word(word=f"word{index}", start=0.5, end=1.5, probability=0.9),),
        )


def test_windows_transcripts_are_joined_on_the_whole_timeline() -> None:
    engine = RecordingEngine(language="de", silent_windows=1)
    parts = [np.zeros(10 * SAMPLE_RATE, np.float32), np.zeros(20 * SAMPLE_RATE, np.float32)]
    parts.append(np.zeros(5 * SAMPLE_RATE, np.float32))
    transcript, seconds = transcribe_windows(engine, "m", iter(parts), TranscribeParams(prompt="Names: Ada."))
    assert seconds == pytest.approx(35.0)
    assert transcript.text == "word1 word2" and transcript.language == "de"
    assert [(s.id, s.start, s.end, s.seek) for s in transcript.segments] == [
        (0, 10.5, 11.5, 1050),
        (1, 30.5, 31.5, 3050),
    ]
    assert [(w.word, w.start) for w in transcript.words] == [("word1", 10.5), ("word2", 30.5)]
    # The caller's prompt until there is text, then the text so far; the language once speech found it.
    assert [(params.prompt, params.language) for _, params in engine.calls] == [
        ("Names: Ada.", None),
        ("Names: Ada.", None),
        ("word1", "de"),
    ]


def test_a_language_the_caller_named_is_kept() -> None:
    joiner = TranscriptJoiner(TranscribeParams(language="fr"))
    joiner.add(Transcript(text="", language="en", segments=()), 30.0)
    assert joiner.params().language == "fr" and joiner.transcript().language == "fr"
    assert TranscriptJoiner(TranscribeParams()).transcript() == Transcript(text="", language="en", segments=())


def test_a_stopped_transcription_ends_at_the_next_window_and_closes_the_decoder() -> None:
    stop = threading.Event()
    closed = threading.Event()

    class LeftDuringTheFirstWindow(RecordingEngine):
        def transcribe(self, model: str, audio: np.ndarray, params: TranscribeParams) -> Transcript:
            stop.set()  # the caller leaves while this window is transcribed
            return super().transcribe(model, audio, params)

    engine = LeftDuringTheFirstWindow()

    def audio() -> Iterator[np.ndarray]:
        try:
            while True:
                yield np.zeros(SAMPLE_RATE, np.float32)
        finally:
            closed.set()

    with pytest.raises(ClientCancelled):
        transcribe_windows(engine, "m", audio(), TranscribeParams(), stop)
    assert len(engine.calls) == 1 and closed.is_set()
