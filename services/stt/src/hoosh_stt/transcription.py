"""One transcription, end to end: admit, receive, probe, reserve, decode and
transcribe window by window, commit, publish.

Admission is bounded: at most ``workers`` transcriptions run and ``max_queue``
more wait (an upload being received already holds its place); one more is
refused at once with ``Overloaded`` rather than piling up.

Every request is bounded in memory and time. The upload is at most
``max_audio_bytes``. Its duration is probed from the container's packets before
anything is decoded: past ``max_audio_seconds`` it is refused (400
``audio_too_long``) with nothing reserved. Then the pool is reserved
``ceil(probed seconds * tokens_per_second)``, and only then is the audio decoded,
``window_seconds`` at a time, each window transcribed and dropped before the next is
decoded: what a transcription holds does not grow with the file's length. A caller
that leaves stops its transcription at the next window. The pool is charged for the
seconds really decoded (within milliseconds of the probe's count, which includes the
codec's padding), committed after the engine succeeds, released on any
failure or cancellation. The reservation is the caller's key's (``owner``) and
covers the pool and every ancestor. Bad audio fails at the probe, before the
reservation, so it is never charged. The caller's key's own RPM / TPM / concurrency
limits (``KeyLimiter``) are checked once the charge is known, just before reserving
(one Redis round trip, none for a key without limits), counting that charge against
TPM; an admitted transcription is finished exactly once when it ends, with the tokens
it was really charged (0 when it failed). Every outcome publishes an
InferenceCompleted/InferenceFailed event with ``kind="transcription"``, the key id
and the pool chain.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh_common.eventbus import Publisher
from hoosh_common.events import SUBJECT_COMPLETED, SUBJECT_FAILED
from hoosh_common.prices import FREE_AUDIO, AudioPrice
from hoosh_common.telemetry import current_trace_id
from hoosh_metering import errors as metering
from hoosh_metering.limits import KeyGate, KeyLimiter, KeyLimits
from hoosh_metering.pools import MAX_PRICE, LedgerLine
from redis.exceptions import RedisError

from . import metrics
from .audio import SAMPLE_RATE, probe, windows
from .budget import SttBudget
from .engine import Engine, ModelInfo, TranscribeParams, Transcript, TranscriptJoiner
from .errors import (
    AudioTooLarge,
    ClientCancelled,
    EngineFailure,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RateLimited,
    SttError,
    Unavailable,
)
from .languages import LANGUAGES, language_name

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_POOL = "default"
DRAIN_FACTOR = 2  # an oversized upload is read (and dropped) up to this many times the limit


@dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    model: str
    language: str = ""
    prompt: str = ""
    temperature: float | None = None
    word_timestamps: bool = False
    pool: str = ""
    user: str = ""
    filename: str = ""
    key_id: str = ""  # the caller's API key id ("" when the edge runs open)
    limits: KeyLimits | None = None  # the key's own limits (None: it has none)


@dataclass(frozen=True, slots=True)
class TranscriptionResult:
    model: str
    transcript: Transcript
    language_name: str
    duration: float
    charged_tokens: int
    cost_usd_micros: int = 0
    pool_chain: tuple[str, ...] = ()  # the pool charged, then its ancestors


class WorkQueue:
    """Bounded admission in front of a fixed number of engine threads."""

    def __init__(self, workers: int, max_queue: int, retry_after: int) -> None:
        self.workers = workers
        self.capacity = workers + max_queue
        self._retry_after = retry_after
        self._admitted = 0
        self._slots = asyncio.Semaphore(workers)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hoosh-stt-engine")

    @property
    def admitted(self) -> int:
        """Requests admitted and not finished (running, waiting or still uploading)."""
        return self._admitted

    def admit(self) -> Ticket:
        """A place in the queue, or ``Overloaded`` when every place is taken."""
        if self._admitted >= self.capacity:
            raise Overloaded(
                f"The speech-to-text service is at capacity ({self.capacity} transcriptions running or queued). "
                "Retry shortly.",
                retry_after=self._retry_after,
            )
        self._admitted += 1
        return Ticket(self)

    def _release(self) -> None:
        self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Ticket:
    """One admitted request. ``close()`` frees its place — when its engine job ends,
    if a cancelled caller left one running (a thread cannot be interrupted, and the
    bound must count the work that really runs)."""

    def __init__(self, queue: WorkQueue) -> None:
        self._queue = queue
        self._job: asyncio.Future[Any] | None = None
        self._closed = False

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on an engine thread once one is free."""
        queue = self._queue
        metrics.QUEUE_DEPTH.inc()
        try:
            await queue._slots.acquire()
        finally:
            metrics.QUEUE_DEPTH.dec()
        job = asyncio.get_running_loop().run_in_executor(queue._executor, fn)
        metrics.ACTIVE.inc()  # until the thread is done, even if its caller left
        job.add_done_callback(_free_slot(queue._slots))
        self._job = job
        return await asyncio.shield(job)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._job is not None and not self._job.done():
            self._job.add_done_callback(lambda _: self._queue._release())
        else:
            self._queue._release()


def _free_slot(slots: asyncio.Semaphore) -> Callable[[asyncio.Future[Any]], None]:
    def done(job: asyncio.Future[Any]) -> None:
        metrics.ACTIVE.dec()
        slots.release()
        if not job.cancelled():
            job.exception()  # retrieved: a failure nobody awaits (caller gone) is not reported twice

    return done


def transcribe_windows(
    engine: Engine,
    model: str,
    audio: Iterable[np.ndarray],
    params: TranscribeParams,
    stop: threading.Event | None = None,
) -> tuple[Transcript, float]:
    """Transcribe ``audio``'s windows one after another (blocking: an engine thread);
    returns the joined transcript and the seconds of audio. Raises ``ClientCancelled``
    at the next window once ``stop`` is set, and whatever the decoding or the engine
    raise; the windows are closed in every case."""
    joiner = TranscriptJoiner(params)
    iterator = iter(audio)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise ClientCancelled("The client cancelled the request")
            samples = next(iterator, None)
            if samples is None:
                break
            joiner.add(engine.transcribe(model, samples, joiner.params()), len(samples) / SAMPLE_RATE)
            del samples
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return joiner.transcript(), joiner.seconds


class TranscriptionService:
    def __init__(
        self,
        engine: Engine,
        budget: SttBudget,
        publisher: Publisher,
        queue: WorkQueue,
        *,
        tokens_per_second: float,
        max_audio_bytes: int,
        max_audio_seconds: float,
        window_seconds: float = 300.0,
        decode_workers: int = 2,
        limiter: KeyLimiter | None = None,
        price: AudioPrice = FREE_AUDIO,
    ) -> None:
        self._engine = engine
        self._budget = budget
        self._limiter = limiter
        self._gate = KeyGate(limiter)
        self._publisher = publisher
        self._queue = queue
        self._tokens_per_second = tokens_per_second
        self._price = price
        # The per-minute price per million pool tokens (rounded up): what the reservation
        # holds against money caps, never less than the commit's per-minute cost.
        self._price_per_mtok = min(
            MAX_PRICE, math.ceil(price.per_minute * 1_000_000 / (60 * tokens_per_second)) if price.per_minute else 0
        )
        self._max_audio_bytes = max_audio_bytes
        self._max_audio_seconds = max_audio_seconds
        self._window_seconds = window_seconds
        self._decoder = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="hoosh-stt-decode")
        self._models: dict[str, ModelInfo] = {model.id: model for model in engine.models()}

    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    @property
    def engine_name(self) -> str:
        """The engine's name: the provider in events and spans."""
        return self._engine.name

    def tokens_for(self, seconds: float) -> int:
        """What ``seconds`` of audio cost in pool tokens (at least 1)."""
        return max(1, math.ceil(seconds * self._tokens_per_second))

    def close(self) -> None:
        self._decoder.shutdown(wait=True, cancel_futures=True)
        self._queue.shutdown()

    # -- validation -----------------------------------------------------------------

    def _validate(self, request: TranscriptionRequest) -> TranscribeParams:
        if not request.model:
            raise InvalidRequest("you must provide a model parameter", param="model")
        info = self._models.get(request.model)
        if info is None:
            raise ModelNotFound(
                f"The model '{request.model}' does not exist. Speech-to-text models: {', '.join(self._models)}.",
                param="model",
            )
        language = request.language.strip().lower()
        if language:
            if language not in LANGUAGES:
                raise InvalidRequest(
                    f"Language '{request.language}' is not supported; give an ISO-639-1 code such as 'en'.",
                    param="language",
                    code="unsupported_language",
                )
            if info.english_only and language != "en":
                raise InvalidRequest(
                    f"The model '{request.model}' transcribes English only; use language 'en' or omit it.",
                    param="language",
                    code="unsupported_language",
                )
        elif info.english_only:
            language = "en"  # nothing to detect
        temperature = request.temperature
        if temperature is not None and not (0.0 <= temperature <= 1.0):
            raise InvalidRequest("temperature must be between 0 and 1.", param="temperature")
        return TranscribeParams(
            language=language or None,
            prompt=request.prompt or None,
            temperature=temperature,
            word_timestamps=request.word_timestamps,
        )

    async def _receive(self, chunks: AsyncIterable[bytes]) -> bytes:
        buffer = bytearray()
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received <= self._max_audio_bytes:
                buffer += chunk
            elif received > DRAIN_FACTOR * self._max_audio_bytes:
                break  # a client that never stops: give up reading it
            # Over the limit: keep reading (and dropping) so the client's writes end
            # cleanly and it receives this status, not a broken stream.
        if received > self._max_audio_bytes:
            raise AudioTooLarge(f"The audio file is larger than the limit of {self._max_audio_bytes} bytes.")
        return bytes(buffer)

    # -- events ---------------------------------------------------------------------

    def _usage(self, tokens: int) -> chat_pb2.Usage:
        return chat_pb2.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)

    def _completed(
        self,
        request: TranscriptionRequest,
        request_id: str,
        pool: str,
        chain: tuple[str, ...],
        tokens: int,
        started: float,
        usd: int = 0,
    ) -> None:
        event = events_pb2.InferenceCompleted(
            request_id=request_id,
            trace_id=current_trace_id(),
            timestamp_ms=int(time.time() * 1000),
            model=request.model,
            provider=self._engine.name,
            pool=pool,
            usage=self._usage(tokens),
            latency_ms=int((time.monotonic() - started) * 1000),
            stream=False,
            user=request.user,
            finish_reason="stop",
            cost_usd=usd / 1_000_000,
            cost_usd_micros=usd,
            kind="transcription",
            key_id=request.key_id,
            pool_chain=list(chain),
        )
        self._publisher.publish_background(SUBJECT_COMPLETED, event, request_id)

    def _failed(
        self,
        request: TranscriptionRequest,
        request_id: str,
        pool: str,
        chain: tuple[str, ...],
        error: SttError,
        started: float,
    ) -> None:
        event = events_pb2.InferenceFailed(
            request_id=request_id,
            trace_id=current_trace_id(),
            timestamp_ms=int(time.time() * 1000),
            model=request.model,
            provider=self._engine.name,
            pool=pool,
            error_code=error.error_code,
            error_message=error.message[:500],
            http_status=error.http_status,
            latency_ms=int((time.monotonic() - started) * 1000),
            stream=False,
            user=request.user,
            usage=self._usage(0),
            kind="transcription",
            key_id=request.key_id,
            pool_chain=list(chain),
            charged_tokens=0,  # a failed transcription's reservation is released
        )
        self._publisher.publish_background(SUBJECT_FAILED, event, request_id)

    # -- the call -------------------------------------------------------------------

    async def transcribe(
        self,
        request: TranscriptionRequest,
        chunks: AsyncIterable[bytes],
        request_id: str,
        on_admitted: Callable[[], Awaitable[None]] | None = None,
    ) -> TranscriptionResult:
        """Transcribe the audio ``chunks`` carry. Raises an ``SttError``; nothing is charged unless it succeeds.

        ``on_admitted`` is awaited once the request holds its place in the queue (the
        server tells its client so with initial metadata, before the upload is read).
        """
        started = time.monotonic()
        pool = request.pool or DEFAULT_POOL
        reserved = False
        admitted: int | None = None  # the tokens the key's limits were charged at admission
        admit_unconfirmed = False  # the admission's reply never came: it may have taken a slot
        chain: tuple[str, ...] = ()
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            params = self._validate(request)
            if not self._publisher.healthy:  # its event could not be kept: refuse before any work
                raise Unavailable(
                    "Events cannot be recorded right now; try again shortly", code="events_unavailable", retry_after=5
                )
            ticket = self._queue.admit()
            try:
                if on_admitted is not None:
                    await on_admitted()
                data = await self._receive(chunks)
                # Refuses bad and over-long audio before anything is reserved or decoded.
                info = await loop.run_in_executor(self._decoder, probe, data, self._max_audio_seconds)
                tokens = self.tokens_for(info.duration)
                if self._limiter is not None and request.limits is not None and request.key_id:
                    # Set before the call: if the script ran but its reply was lost, the
                    # end still frees the slot (finishing an id never admitted is a no-op).
                    admitted = tokens
                    try:
                        await self._admit_key(request, request_id, tokens)
                    except RateLimited:
                        admitted = None  # refused: nothing was counted, nothing to finish
                        raise
                    except BaseException:
                        admit_unconfirmed = True
                        raise
                # Set before the call: a cancellation mid-reserve still releases (a no-op
                # when nothing was reserved).
                reserved = True
                chain = await self._budget.reserve(
                    pool, tokens, request_id, owner=request.key_id, price_micros_per_mtok=self._price_per_mtok
                )
                audio = windows(data, self._window_seconds, self._max_audio_seconds)
                del data
                try:
                    transcript, duration = await ticket.run(
                        partial(transcribe_windows, self._engine, request.model, audio, params, stop)
                    )
                except SttError:
                    raise
                except Exception as exc:
                    log.exception("engine failed", extra={"model": request.model})
                    raise EngineFailure(f"The speech-to-text engine failed: {type(exc).__name__}") from exc
                charged = self.tokens_for(duration)
                cost = self._price.cost(math.ceil(duration * 1000))
            finally:
                stop.set()  # a caller gone mid-transcription: its job stops at the next window
                ticket.close()
        except BaseException as error:
            try:
                stt_error = await self._end_failed(request, request_id, pool, chain, reserved, error, started)
            finally:  # nothing was charged; shielded, so a second cancellation cannot skip it
                await asyncio.shield(self._finish_key(request, request_id, admitted, 0, unconfirmed=admit_unconfirmed))
            if isinstance(error, asyncio.CancelledError):
                raise
            raise stt_error from error
        # The engine's work is done: commit and record even if the client leaves meanwhile.
        await asyncio.shield(self._finish(request, request_id, pool, chain, charged, started, admitted, cost))
        # The request's log line is the server's (every outcome, with the request's span).
        return TranscriptionResult(
            model=request.model,
            transcript=transcript,
            language_name=language_name(transcript.language),
            duration=duration,
            charged_tokens=charged,
            cost_usd_micros=cost,
            pool_chain=chain,
        )

    async def _admit_key(self, request: TranscriptionRequest, request_id: str, tokens: int) -> None:
        """Count this transcription (``tokens`` against TPM) against its key's limits.
        Raises RateLimited (429 with Retry-After at the edge) or Unavailable."""
        assert self._limiter is not None and request.limits is not None
        try:
            await self._gate.admit(request.key_id, request_id, request.limits, tokens)
        except metering.RateLimited as error:
            raise RateLimited(error.message, retry_after=max(1, error.retry_after_seconds)) from error
        except (metering.BudgetUnavailable, RedisError) as error:
            # Nothing is admitted free; the reply may have been lost after the script
            # ran, so the end still finishes it.
            raise Unavailable(
                "The key's rate limits are unavailable; retry shortly.", code="budget_unavailable"
            ) from error

    async def _finish_key(
        self,
        request: TranscriptionRequest,
        request_id: str,
        admitted: int | None,
        actual: int,
        *,
        unconfirmed: bool = False,
    ) -> None:
        """Free the key's concurrency slot and correct its TPM by ``actual - admitted``;
        best effort (an unfreed slot frees itself after the limiter's in-flight TTL)."""
        if admitted is None or request.limits is None:
            return
        await self._gate.finish(
            request.key_id, request_id, request.limits, estimated=admitted, actual=actual, unconfirmed=unconfirmed
        )

    async def drain_key_limits(self) -> None:
        """At shutdown: finishes under way may complete; repeats still waiting are dropped."""
        await self._gate.drain(1.0)

    async def _finish(
        self,
        request: TranscriptionRequest,
        request_id: str,
        pool: str,
        chain: tuple[str, ...],
        tokens: int,
        started: float,
        admitted: int | None,
        usd: int = 0,
    ) -> None:
        try:
            ledger = LedgerLine(self._engine.name, request.model, tokens, 0)
            await self._budget.commit(
                request_id, tokens, pool=pool, owner=request.key_id, usd_micros=usd, ledger=ledger
            )
            self._completed(request, request_id, pool, chain, tokens, started, usd)
            if self._publisher.keeping:  # NATS away: answer once the event is on disk
                await self._publisher.wait_kept()
        finally:
            await self._finish_key(request, request_id, admitted, tokens)

    async def _end_failed(
        self,
        request: TranscriptionRequest,
        request_id: str,
        pool: str,
        chain: tuple[str, ...],
        reserved: bool,
        error: BaseException,
        started: float,
    ) -> SttError:
        """Release the reservation (if any) and record the failure; returns the error to raise."""
        task = asyncio.current_task()
        if isinstance(error, asyncio.CancelledError) or (task is not None and task.cancelling()):
            stt_error: SttError = ClientCancelled("The client cancelled the request")
        elif isinstance(error, SttError):
            stt_error = error
        else:
            log.exception("unexpected failure in transcription", exc_info=error)
            stt_error = EngineFailure(f"Internal failure: {type(error).__name__}")
        if reserved:
            await asyncio.shield(self._budget.release(request_id, pool=pool, owner=request.key_id))
        if not chain:  # refused before (or while) reserving: look the chain up for the event
            chain = await asyncio.shield(self._budget.chain(pool))
        self._failed(request, request_id, pool, chain, stt_error, started)
        return stt_error
