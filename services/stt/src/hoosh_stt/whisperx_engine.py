"""The GPU engine: whisperx (batched faster-whisper over pyannote VAD segments,
then wav2vec2 forced alignment for word timings).

``whisperx`` (and the CUDA torch it pins) is installed only in the GPU image
(``pip install hoosh-stt[gpu]``, ``Dockerfile.gpu``); it is imported when this
engine is built, never at module import, so nothing else needs it.

Offline rules: the pyannote VAD bundled with whisperx works offline once
``PYANNOTE_METRICS_ENABLED=0``; its Silero option downloads and is not used.
Word alignment needs a wav2vec2 model on local disk (``HOOSH_STT_ALIGN_MODEL_DIR``,
or the torch/HF caches); when none loads, word timings come from faster-whisper's
own cross-attention timestamps on the same model instead.

Silence: the batched pipeline only ever transcribes what pyannote's VAD found to be
speech; ``vad_filter`` (``HOOSH_STT_VAD_FILTER``) governs the one path that bypasses
it, that fallback (faster-whisper's bundled Silero VAD, as the CPU engine uses).
Like every engine it is handed one window of the audio at a time.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .engine import (
    ModelInfo,
    ModelSpec,
    Segment,
    TranscribeParams,
    Transcript,
    Word,
    compression_ratio,
    from_faster_whisper,
)
from .errors import EngineUnavailable
from .faster_whisper_engine import FALLBACK_TEMPERATURES

log = logging.getLogger(__name__)


class WhisperXEngine:
    name = "whisperx"

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        device: str = "cuda",
        compute_type: str = "float16",
        batch_size: int = 16,
        beam_size: int = 5,
        cpu_threads: int = 0,
        align_model_dir: Path | None = None,
        vad_filter: bool = True,
    ) -> None:
        os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")
        try:
            import whisperx
        except ImportError as exc:
            raise EngineUnavailable(
                "the whisperx engine needs the 'whisperx' package (the GPU image: pip install 'hoosh-stt[gpu]')"
            ) from exc
        self._whisperx: Any = whisperx
        self._specs = specs
        self._device = device
        self._compute_type = compute_type
        self._batch_size = batch_size
        self._beam_size = beam_size
        self._cpu_threads = cpu_threads
        self._align_model_dir = align_model_dir
        self._vad_filter = vad_filter
        self._pipelines: dict[str, Any] = {}
        self._english_only: dict[str, bool] = {}
        self._aligners: dict[str, tuple[Any, Any] | None] = {}  # language -> (model, metadata); None: unavailable
        # A pipeline keeps per-call state (options, tokenizer): one transcription at a time per engine.
        self._lock = threading.Lock()

    def load(self) -> None:
        for spec in self._specs:
            english_only = spec.id.endswith(".en") or spec.path.name.endswith(".en")
            try:
                pipeline = self._whisperx.load_model(
                    str(spec.path),
                    self._device,
                    compute_type=self._compute_type,
                    language="en" if english_only else None,
                    asr_options={"beam_size": self._beam_size},
                    vad_method="pyannote",
                    local_files_only=True,
                    threads=self._cpu_threads or 4,
                )
            except Exception as exc:  # whisperx raises whatever torch/ctranslate2 raise
                raise EngineUnavailable(f"whisperx cannot load model '{spec.id}' from {spec.path}: {exc}") from exc
            self._pipelines[spec.id] = pipeline
            self._english_only[spec.id] = english_only or not pipeline.model.model.is_multilingual
            log.info("model loaded", extra={"model": spec.id, "engine": self.name, "device": self._device})

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=name, engine=self.name, english_only=self._english_only[name]) for name in self._pipelines]

    def _aligner(self, language: str) -> tuple[Any, Any] | None:
        if language not in self._aligners:
            kwargs: dict[str, Any] = {"language_code": language, "device": self._device}
            if self._align_model_dir is not None:
                kwargs["model_dir"] = str(self._align_model_dir)
            if "model_cache_only" in inspect.signature(self._whisperx.load_align_model).parameters:
                kwargs["model_cache_only"] = True  # whisperx >= 3.4: never download a Hugging Face model
            try:
                self._aligners[language] = self._whisperx.load_align_model(**kwargs)
            except Exception as exc:  # no local model and no network: fall back, once per language
                log.warning("no alignment model; word timings from faster-whisper", extra={"language": language})
                log.debug("alignment model load failed", exc_info=exc)
                self._aligners[language] = None
        return self._aligners[language]

    def transcribe(self, model: str, audio: np.ndarray, params: TranscribeParams) -> Transcript:
        with self._lock:
            return self._transcribe(model, audio, params)

    def _transcribe(self, model: str, audio: np.ndarray, params: TranscribeParams) -> Transcript:
        pipeline = self._pipelines[model]
        temperatures = [params.temperature] if params.temperature else list(FALLBACK_TEMPERATURES)
        default_options = pipeline.options
        pipeline.options = replace(default_options, initial_prompt=params.prompt or None, temperatures=temperatures)
        try:
            result = pipeline.transcribe(audio, batch_size=self._batch_size, language=params.language)
            language = result["language"]
            raw_segments = result["segments"]
            words: tuple[Word, ...] = ()
            if params.word_timestamps:
                aligner = self._aligner(language)
                if aligner is None:
                    # The pipeline's model is a faster-whisper WhisperModel: its own word timestamps.
                    segments, info = pipeline.model.transcribe(
                        audio,
                        language=language,
                        initial_prompt=params.prompt or None,
                        temperature=temperatures if len(temperatures) > 1 else temperatures[0],
                        beam_size=self._beam_size,
                        word_timestamps=True,
                        vad_filter=self._vad_filter,
                    )
                    return from_faster_whisper(segments, info.language, True)
                align_model, metadata = aligner
                aligned = self._whisperx.align(
                    raw_segments, align_model, metadata, audio, self._device, return_char_alignments=False
                )
                raw_segments = aligned["segments"]
                words = _aligned_words(aligned.get("word_segments") or [])
        finally:
            pipeline.options = default_options
        tokenizer = pipeline.model.hf_tokenizer
        segments_out = tuple(
            Segment(
                id=index,
                seek=round(float(raw["start"]) * 100),  # Whisper's seek counts 10 ms frames
                start=float(raw["start"]),
                end=float(raw["end"]),
                text=raw["text"] if raw["text"].startswith(" ") else " " + raw["text"],
                tokens=tuple(tokenizer.encode(raw["text"], add_special_tokens=False).ids),
                temperature=float(temperatures[0]),
                avg_logprob=float(raw.get("avg_logprob", 0.0)),
                compression_ratio=compression_ratio(raw["text"]),
                no_speech_prob=0.0,
            )
            for index, raw in enumerate(raw_segments)
        )
        text = "".join(segment.text for segment in segments_out).strip()
        return Transcript(text=text, language=language, segments=segments_out, words=words)

    def close(self) -> None:
        self._pipelines.clear()
        self._aligners.clear()


def _aligned_words(raw: list[dict[str, Any]]) -> tuple[Word, ...]:
    """whisperx's word_segments; a word it could not align (digits, symbols) borrows its neighbour's time."""
    words: list[Word] = []
    previous_end = 0.0
    for item in raw:
        start = float(item.get("start", previous_end))
        end = float(item.get("end", start))
        words.append(
            Word(word=str(item["word"]).strip(), start=start, end=end, probability=float(item.get("score", 0)))
        )
        previous_end = end
    return tuple(words)
