"""The CPU engine and the decoder on real speech: espeak-ng's rendering of a known
sentence, transcribed by the bundled tiny.en, from every common container."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from faster_whisper.tokenizer import _LANGUAGE_CODES
from hoosh_stt.audio import SAMPLE_RATE, decode, wav_shortfall
from hoosh_stt.engine import TranscribeParams
from hoosh_stt.errors import AudioTooLong, AudioTooShort, EngineUnavailable, InvalidAudio
from hoosh_stt.faster_whisper_engine import FasterWhisperEngine
from hoosh_stt.languages import LANGUAGES, language_name
from hoosh_stt.wer import word_error_rate

from .conftest import SENTENCE, encode

CONTAINERS = {
    "wav": None,
    "flac": ("flac", "flac", None),
    "mp3": ("mp3", "libmp3lame", None),
    "ogg": ("ogg", "libopus", 48_000),
    "webm": ("webm", "libopus", 48_000),
    "m4a": ("ipod", "aac", None),  # FFmpeg's muxer name for .m4a
}


def as_container(speech: bytes, name: str) -> bytes:
    spec = CONTAINERS[name]
    return speech if spec is None else encode(speech, *spec)


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_every_common_container_decodes_to_16k_mono(speech: bytes, container: str) -> None:
    reference = decode(speech, max_seconds=60)
    audio = decode(as_container(speech, container), max_seconds=60)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.duration - reference.duration) < 0.2  # codec padding only
    assert np.abs(audio.samples).max() > 0.05  # speech, not silence


@pytest.mark.slow
def test_engine_transcribes_the_sentence_with_segments_and_words(engine: FasterWhisperEngine, speech: bytes) -> None:
    audio = decode(speech, max_seconds=60)
    transcript = engine.transcribe("whisper-tiny.en", audio.samples, TranscribeParams(word_timestamps=True))
    assert word_error_rate(SENTENCE, transcript.text) <= 0.25, transcript.text
    assert transcript.language == "en"
    assert transcript.segments and transcript.segments[0].id == 0
    assert transcript.segments[-1].end <= audio.duration + 0.5
    assert all(segment.tokens for segment in transcript.segments)
    starts = [word.start for word in transcript.words]
    assert len(transcript.words) >= 7 and starts == sorted(starts)
    assert all(word.start <= word.end for word in transcript.words)
    assert word_error_rate(SENTENCE, " ".join(word.word for word in transcript.words)) <= 0.25


@pytest.mark.slow
def test_words_only_when_asked(engine: FasterWhisperEngine, speech: bytes) -> None:
    audio = decode(speech, max_seconds=60)
    transcript = engine.transcribe("whisper-tiny.en", audio.samples, TranscribeParams(temperature=0.2, prompt="Fox."))
    assert transcript.words == ()
    assert transcript.text


@pytest.mark.slow
def test_silence_gives_no_text_through_the_voice_activity_filter(
    engine: FasterWhisperEngine, silence: Callable[[float], np.ndarray]
) -> None:
    # Without the filter, tiny.en answers a minute of silence with "You" (issue 9).
    transcript = engine.transcribe("whisper-tiny.en", silence(60), TranscribeParams())
    assert (transcript.text, transcript.segments) == ("", ())


def test_the_vad_model_ships_inside_faster_whisper() -> None:
    # No download: Silero's ONNX file is a package asset, run by onnxruntime.
    import faster_whisper
    from faster_whisper.vad import get_vad_model

    package = Path(faster_whisper.__file__).parent
    assert any(path.suffix == ".onnx" for path in (package / "assets").iterdir())
    probabilities = get_vad_model()(np.zeros(512 * 32, dtype=np.float32))  # whole 32 ms frames
    assert float(np.max(probabilities)) < 0.5  # silence is not speech


@pytest.mark.slow
def test_engine_reports_its_models(engine: FasterWhisperEngine) -> None:
    [model] = engine.models()
    assert model.id == "whisper-tiny.en" and model.engine == "faster-whisper" and model.english_only


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda wav: b"", InvalidAudio, "empty"),
        (lambda wav: b"hello, this is a text file and not audio at all\n" * 20, InvalidAudio, "could not be decoded"),
        (lambda wav: wav[: len(wav) // 2], InvalidAudio, "truncated"),
        (lambda wav: wav[:44], InvalidAudio, "truncated"),
        (lambda wav: encode(wav, "flac", "flac")[:20_000], InvalidAudio, "truncated"),
        (lambda wav: wav[:44] + b"\x00" * 400, InvalidAudio, "truncated"),
    ],
    ids=["empty", "text-file", "half-wav", "header-only", "cut-flac", "tiny-wav"],
)
def test_bad_audio_is_refused_with_a_reason(speech: bytes, make, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as raised:
        decode(make(speech), max_seconds=60)
    assert fragment in str(raised.value)
    assert raised.value.param == "file"  # type: ignore[attr-defined]


def test_audio_shorter_than_a_tenth_of_a_second_is_too_short(speech: bytes) -> None:
    samples = 800  # 50 ms at 16 kHz, in a WAV whose header is right
    wav = encode(speech, "wav", "pcm_s16le", rate=SAMPLE_RATE)
    header_end = wav.index(b"data") + 8
    body = wav[header_end : header_end + samples * 2]
    short = wav[:4] + (len(body) + header_end - 8).to_bytes(4, "little") + wav[8 : header_end - 4]
    short += len(body).to_bytes(4, "little") + body
    assert wav_shortfall(short) == 0
    with pytest.raises(AudioTooShort):
        decode(short, max_seconds=60)


def test_audio_over_the_duration_limit_is_refused(speech: bytes) -> None:
    with pytest.raises(AudioTooLong) as raised:
        decode(speech, max_seconds=1.0)
    error = raised.value
    assert (error.http_status, error.error_type, error.error_code, error.param) == (
        400,
        "invalid_request_error",
        "audio_too_long",
        "file",
    )


def test_streamed_wav_without_a_length_is_not_called_truncated(speech: bytes) -> None:
    position = speech.index(b"data") + 4
    streamed = speech[:position] + b"\xff\xff\xff\xff" + speech[position + 4 :]
    assert wav_shortfall(streamed) == 0
    assert decode(streamed, max_seconds=60).duration > 2


def test_word_error_rate() -> None:
    assert word_error_rate(SENTENCE, "The quick brown fox jumps over the lazy dog.") == 0
    assert word_error_rate(SENTENCE, "The quick brown fox jump over the lazy dog.") == pytest.approx(1 / 9)
    assert word_error_rate(SENTENCE, "") == 1
    assert word_error_rate("a b", "a b c d") == 1


def test_languages_are_whispers() -> None:
    assert set(LANGUAGES) == set(_LANGUAGE_CODES)
    assert language_name("en") == "english" and language_name("xx") == "xx"


def test_whisperx_engine_is_imported_lazily_and_refuses_clearly_without_whisperx() -> None:
    sys.modules.pop("hoosh_stt.whisperx_engine", None)
    module = importlib.import_module("hoosh_stt.whisperx_engine")
    assert "whisperx" not in sys.modules  # importing the engine module loads no torch
    with pytest.raises(EngineUnavailable, match="whisperx"):
        module.WhisperXEngine([])
