"""The whisperx engine's own logic (options per call, segment mapping, word timings
with and without an alignment model) over a stand-in for the ``whisperx`` module.

whisperx itself needs a CUDA torch and lives only in the GPU image
(scripts/stt_gpu_check.sh runs the real one there). The stand-in keeps whisperx's
call shapes (load_model -> pipeline with .options/.model/.transcribe, load_align_model,
align) and runs the real tiny.en through faster-whisper underneath.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from faster_whisper import WhisperModel
from faster_whisper.transcribe import TranscriptionOptions
from hoosh_stt.audio import decode
from hoosh_stt.engine import BUNDLED_MODEL, ModelSpec, TranscribeParams, bundled_model_dir
from hoosh_stt.errors import EngineUnavailable
from hoosh_stt.transcription import transcribe_windows
from hoosh_stt.wer import word_error_rate
from hoosh_stt.whisperx_engine import WhisperXEngine

from .conftest import SENTENCE

pytestmark = pytest.mark.slow  # loads the real Whisper model


class Pipeline:
    """whisperx's FasterWhisperPipeline as the engine uses it."""

    def __init__(self, model: WhisperModel) -> None:
        self.model = model
        self.options = TranscriptionOptions(
            beam_size=5, best_of=5, patience=1, length_penalty=1, repetition_penalty=1, no_repeat_ngram_size=0,
            log_prob_threshold=-1.0, no_speech_threshold=0.6, compression_ratio_threshold=2.4,
            condition_on_previous_text=False, prompt_reset_on_temperature=0.5, temperatures=[0.0],
            initial_prompt=None, prefix=None, suppress_blank=True, suppress_tokens=[-1], without_timestamps=True,
            max_initial_timestamp=0.0, word_timestamps=False, prepend_punctuations="", append_punctuations="",
            multilingual=False, max_new_tokens=None, clip_timestamps=[0.0], hallucination_silence_threshold=None,
            hotwords=None,
        )  # fmt: skip
        self.seen_options: list[TranscriptionOptions] = []

    def transcribe(self, audio: np.ndarray, batch_size: int, language: str | None) -> dict[str, Any]:
        self.seen_options.append(self.options)
        segments, info = self.model.transcribe(audio, language=language, initial_prompt=self.options.initial_prompt)
        return {
            "segments": [
                {"text": s.text.strip(), "start": s.start, "end": s.end, "avg_logprob": -0.3} for s in segments
            ],
            "language": info.language,
        }


def stand_in(aligner: bool) -> tuple[types.ModuleType, list[Pipeline]]:
    module = types.ModuleType("whisperx")
    pipelines: list[Pipeline] = []

    def load_model(path: str, device: str, **kwargs: Any) -> Pipeline:
        assert kwargs["local_files_only"] and kwargs["vad_method"] == "pyannote" and kwargs["language"] == "en"
        pipelines.append(Pipeline(WhisperModel(path, device="cpu", compute_type="int8")))
        return pipelines[-1]

    def load_align_model(language_code: str, device: str, model_dir: str | None = None, model_cache_only: bool = False):
        assert model_cache_only  # never a download
        if not aligner:
            raise ValueError("no local alignment model")
        return object(), {"language": language_code}

    def align(segments: list[dict[str, Any]], model: object, metadata: dict, audio: np.ndarray, device: str, **kw):
        words = [w for s in segments for w in s["text"].split()]
        step = len(audio) / 16_000 / len(words)
        word_segments = [
            {"word": w, "start": i * step, "end": (i + 1) * step, "score": 0.9} for i, w in enumerate(words)
        ]
        del word_segments[1]["start"]  # whisperx leaves words it cannot align without times
        return {"segments": segments, "word_segments": word_segments}

    module.load_model = load_model  # type: ignore[attr-defined]
    module.load_align_model = load_align_model  # type: ignore[attr-defined]
    module.align = align  # type: ignore[attr-defined]
    return module, pipelines


@pytest.fixture
def audio(speech: bytes) -> np.ndarray:
    return decode(speech, max_seconds=60).samples


@pytest.mark.parametrize("aligner", [True, False], ids=["wav2vec2-aligned", "faster-whisper-words"])
def test_whisperx_engine_transcribes_with_words(
    monkeypatch: pytest.MonkeyPatch, audio: np.ndarray, aligner: bool
) -> None:
    module, pipelines = stand_in(aligner)
    monkeypatch.setitem(sys.modules, "whisperx", module)
    engine = WhisperXEngine([ModelSpec(BUNDLED_MODEL, bundled_model_dir())], device="cpu", compute_type="int8")
    engine.load()
    assert [(m.id, m.engine, m.english_only) for m in engine.models()] == [(BUNDLED_MODEL, "whisperx", True)]

    plain = engine.transcribe(BUNDLED_MODEL, audio, TranscribeParams(prompt="Foxes.", temperature=0.3))
    assert word_error_rate(SENTENCE, plain.text) <= 0.25 and plain.language == "en" and plain.words == ()
    [segment] = plain.segments
    assert segment.text.startswith(" ") and segment.tokens and segment.temperature == pytest.approx(0.3)
    assert segment.seek == round(segment.start * 100) and segment.compression_ratio > 0
    pipeline = pipelines[0]
    assert pipeline.seen_options[-1].initial_prompt == "Foxes." and pipeline.seen_options[-1].temperatures == [0.3]
    assert pipeline.options == replace(pipeline.seen_options[-1], initial_prompt=None, temperatures=[0.0])  # restored

    worded = engine.transcribe(BUNDLED_MODEL, audio, TranscribeParams(word_timestamps=True))
    assert word_error_rate(SENTENCE, " ".join(w.word for w in worded.words)) <= 0.25
    starts = [w.start for w in worded.words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in worded.words)

    # As the service drives it: one window at a time, joined on the whole timeline.
    seconds = len(audio) / 16_000
    twice, total = transcribe_windows(engine, BUNDLED_MODEL, [audio, audio], TranscribeParams(word_timestamps=True))
    assert total == pytest.approx(2 * seconds)
    assert word_error_rate(f"{SENTENCE} {SENTENCE}", twice.text) <= 0.25
    assert [segment.id for segment in twice.segments] == list(range(len(twice.segments)))
    assert twice.segments[-1].start >= seconds and twice.segments[-1].end <= 2 * seconds + 0.5
    assert sum(word.start >= seconds for word in twice.words) >= 7
    engine.close()


def test_whisperx_engine_without_whisperx_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "whisperx", None)  # import whisperx -> ImportError
    with pytest.raises(EngineUnavailable, match=r"hoosh-stt\[gpu\]"):
        WhisperXEngine([])
