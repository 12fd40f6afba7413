"""The CPU engine: llama.cpp (llama-cpp-python) over a GGUF file.

llama.cpp is not thread-safe, so one worker thread owns the model and runs one
generation at a time; requests wait in a FIFO queue of bounded depth. Tokens
cross to the event loop through ``loop.call_soon_threadsafe`` into a per-request
``asyncio.Queue``. A consumer that goes away (client cancelled) sets the job's
cancel flag and the worker stops at the next token, so the queue moves on.

The prompt is built with the model's own chat template from the GGUF metadata
(``tokenizer.chat_template``), rendered by llama-cpp-python's Jinja2 formatter:
the same thing ``Llama.create_chat_completion`` uses when no chat_format is forced.
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import logging
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jinja2
import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .engine import (
    EngineName,
    FinishReason,
    Generation,
    GenerationRequest,
    Message,
    ModelInfo,
    SamplingOptions,
    StopMatcher,
    StreamChunk,
    Usage,
    check_model,
    collect,
    reject_tools,
    resolve_max_tokens,
    template_messages,
    validate_sampling,
)
from .errors import EngineFailure, EngineUnavailable, InvalidRequest, QueueFull

log = logging.getLogger(__name__)

_SEED_MASK = 0xFFFFFFFF  # llama.cpp seeds are uint32


@dataclass(slots=True)
class WorkerStats:
    """Counters kept by the worker thread (read-only for everyone else)."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0


class _Job:
    """One request on its way through the worker thread."""

    __slots__ = ("cancelled", "context", "loop", "max_tokens", "options", "queue", "request_id", "tokens")

    def __init__(
        self,
        tokens: list[int],
        max_tokens: int,
        options: SamplingOptions,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.options = options
        self.request_id = request_id
        self.loop = loop
        # The submitter's context (request id, trace): the worker's log lines run in it.
        self.context = contextvars.copy_context()
        self.queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: StreamChunk | BaseException) -> None:
        """Hand an item to the event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class LlamaEngine:
    """A GGUF model served by llama.cpp from one worker thread."""

    name: EngineName = "llama.cpp"

    def __init__(
        self,
        *,
        model_id: str,
        model_path: str | Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        max_queue: int = 64,
    ) -> None:
        """Load the model (blocking) and start the worker thread.

        ``max_queue`` is how many requests may wait behind the one running;
        one more answers ``QueueFull``.
        """
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.model_id = model_id
        self.max_queue = max_queue
        # n_threads_batch defaults to every CPU of the host, not of the container: pin both.
        self._llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            self._llm.close()
            raise ValueError(f"{path.name} has no chat template (tokenizer.chat_template) in its metadata")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llm.token_eos()),
            bos_token=self._token_text(self._llm.token_bos()),
            add_generation_prompt=True,
        )
        self._vocab = self._llm._model.vocab  # for llama_vocab_is_eog (no public accessor)
        self._context_length = self._llm.n_ctx()
        self.stats = WorkerStats()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._waiting = 0
        self._running = 0
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="llama-worker", daemon=True)
        self._worker.start()
        log.info(
            "model loaded",
            extra={"model": model_id, "path": str(path), "n_ctx": self._context_length, "threads": n_threads},
        )

    # -- public API ---------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the worker (not counting the one running)."""
        return self._waiting

    @property
    def active_requests(self) -> int:
        """1 while the worker runs a job, else 0 (a plain read: safe from the scrape thread)."""
        return self._running

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return self._waiting + self._running

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model_id, engine=self.name, context_length=self._context_length)]

    def render_prompt(self, messages: tuple[Message, ...]) -> str:
        """The prompt text the model sees for these messages (chat template applied)."""
        return self._render(template_messages(messages, self.model_id))

    async def count_tokens(self, model: str, messages: tuple[Message, ...]) -> int:
        check_model(model, self.model_id)
        dicts = template_messages(messages, self.model_id)
        return len(await asyncio.to_thread(self._tokenize_chat, dicts))

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request), self.model_id)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        # Everything that can be refused is checked before the job is queued.
        if self._closed:
            raise EngineUnavailable("The inference engine is shutting down.")
        check_model(request.model, self.model_id)
        validate_sampling(request.sampling)
        reject_tools(request, self.model_id)
        dicts = template_messages(request.messages, self.model_id)
        # Tokenizing only reads the vocabulary, which llama.cpp allows from any
        # thread (llama-server tokenizes in its HTTP threads); keep it off the loop.
        tokens = await asyncio.to_thread(self._tokenize_chat, dicts)
        max_tokens = resolve_max_tokens(len(tokens), request.sampling.max_tokens, self._context_length)
        job = _Job(tokens, max_tokens, request.sampling, request.request_id, asyncio.get_running_loop())
        self._submit(job)
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise EngineFailure("The local model failed while generating.") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # No-op after a normal end; otherwise the worker stops at the next token.
            job.cancelled.set()

    async def close(self) -> None:
        """Refuse new work, let the worker drain, then free the model."""
        if self._closed:
            return
        with self._lock:  # after this, _submit refuses: nothing lands behind the sentinel
            self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._worker.join)
        self._llm.close()

    # -- internals ----------------------------------------------------------

    def _token_text(self, token: int) -> str:
        return self._llm._model.token_get_text(token) if token != -1 else ""

    def _render(self, dicts: list[dict[str, Any]]) -> str:
        try:
            return self._formatter(messages=cast(Any, dicts)).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            # Templates call raise_exception() for conversations they refuse
            # (e.g. roles that do not alternate): that is the caller's error.
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}") from exc

    def _tokenize_chat(self, dicts: list[dict[str, Any]]) -> list[int]:
        prompt = self._render(dicts)
        # The template already wrote the special tokens (as create_chat_completion assumes).
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise EngineUnavailable("The inference engine is shutting down.")
            if self._waiting >= self.max_queue:
                raise QueueFull(
                    f"The local model is busy: {self._waiting} requests are already waiting.", retry_after=1
                )
            self._waiting += 1
        self._jobs.put(job)

    def _run(self) -> None:
        """Worker thread: one job at a time, in arrival order."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running = 1
            try:
                if job.cancelled.is_set():  # its client left while it waited
                    self.stats.cancelled += 1
                else:
                    self._run_job(job)
            except Exception as exc:
                self.stats.failed += 1
                job.context.run(log.exception, "generation failed", extra={"request_id": job.request_id})
                job.emit(exc)
            finally:
                self._running = 0

    def _run_job(self, job: _Job) -> None:
        llm = self._llm
        opts = job.options
        llm.set_seed(opts.seed & _SEED_MASK if opts.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        # OpenAI defaults (temperature 1, top_p 1) and no llama.cpp-only truncation (top_k, min_p).
        tokens = llm.generate(
            job.tokens,
            top_k=0,
            top_p=1.0 if opts.top_p is None else opts.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=1.0 if opts.temperature is None else opts.temperature,
            repeat_penalty=1.0,
            frequency_penalty=opts.frequency_penalty,
            presence_penalty=opts.presence_penalty,
            reset=True,
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(opts.stop)
        completion = 0
        finish: FinishReason = "length"
        stopped = False
        tail = ""
        try:
            for token in tokens:
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    # The server logs the request's own line; this is the worker's detail.
                    job.context.run(
                        log.debug,
                        "job cancelled",
                        extra={"request_id": job.request_id, "completion_tokens": completion},
                    )
                    return
                if not opts.ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                completion += 1
                text, stopped = stops.feed(decoder.decode(llm.detokenize([token])))
                if stopped:
                    finish, tail = "stop", text
                    break
                if text:
                    job.emit(StreamChunk(text=text))
                if completion >= job.max_tokens:
                    break
        finally:
            tokens.close()
        if not stopped:
            # Bytes of an unfinished character, then any text held for a stop check.
            tail, stopped = stops.feed(decoder.decode(b"", final=True))
            if stopped:
                finish = "stop"
            else:
                tail += stops.flush()
        usage = Usage(prompt_tokens=len(job.tokens), completion_tokens=completion)
        self.stats.completed += 1
        job.emit(StreamChunk(text=tail, finish_reason=finish, usage=usage))
        job.context.run(
            log.debug,
            "job finished",
            extra={
                "request_id": job.request_id,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": completion,
                "finish_reason": finish,
            },
        )
