"""The GPU engine: vLLM's async engine behind the same interface as llama.cpp.

vLLM is imported only inside ``VllmEngine.start`` so that nothing else (the CPU
image, the tests) needs it installed. The API used is vLLM's documented one:
``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`` and
``engine.generate(prompt, SamplingParams, request_id)`` yielding ``RequestOutput``s
(with ``RequestOutputKind.DELTA``, each carries only the new text and token ids).
The prompt is rendered with the tokenizer's own ``apply_chat_template`` and sent
as token ids, so the prompt token count we report is the one the model saw.

vLLM batches requests itself; ``max_in_flight`` only bounds how many this
process admits at once (one more answers ``QueueFull``). Of those, a request counts as
waiting (``queue_depth``) until vLLM returns its first output (scheduled, prefilled,
first token sampled) and as active (``active_requests``) from then on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine import (
    EngineName,
    FinishReason,
    Generation,
    GenerationRequest,
    Message,
    ModelInfo,
    SamplingOptions,
    StreamChunk,
    Usage,
    check_model,
    collect,
    reject_tools,
    resolve_max_tokens,
    template_messages,
    validate_sampling,
)
from .errors import EngineFailure, EngineUnavailable, InferenceError, InvalidRequest, QueueFull

log = logging.getLogger(__name__)


def sampling_kwargs(options: SamplingOptions, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` (OpenAI defaults where unset)."""
    return {
        "n": 1,
        "max_tokens": max_tokens,  # vLLM's own default is 16: always set it
        "temperature": 1.0 if options.temperature is None else options.temperature,
        "top_p": 1.0 if options.top_p is None else options.top_p,
        "stop": list(options.stop) or None,
        "seed": options.seed,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "ignore_eos": options.ignore_eos,
        "skip_special_tokens": True,
    }


def _map_error(exc: Exception) -> InferenceError:
    """vLLM's exceptions by name, since vllm itself is imported lazily."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"EngineDeadError", "AsyncEngineDeadError"}:
        return EngineUnavailable("The vLLM engine is not running.")
    if names & {"VLLMValidationError", "ValueError"}:
        return InvalidRequest(str(exc))
    return EngineFailure("The local model failed while generating.")


class VllmEngine:
    """A Hugging Face model (id or path) served by vLLM on the GPU."""

    name: EngineName = "vllm"

    def __init__(
        self, *, model_id: str, engine: Any, tokenizer: Any, context_length: int, max_in_flight: int = 64
    ) -> None:
        """Wrap an already started ``AsyncLLMEngine``; use ``start`` to build one."""
        self.model_id = model_id
        self.max_in_flight = max_in_flight
        self._engine = engine
        self._tokenizer = tokenizer
        self._context_length = context_length
        self._in_flight = 0
        self._waiting = 0  # in flight, no output from vLLM yet
        self._closed = False
        # One thread: a Hugging Face tokenizer is not safe to share across threads,
        # and templating/tokenizing long prompts must not block the event loop.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-tokenize")

    @classmethod
    async def start(
        cls,
        *,
        model_id: str,
        model: str,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_in_flight: int = 64,
    ) -> VllmEngine:
        """Load ``model`` (HF id or local path) into vLLM. Blocks while the weights load,
        which is fine at start-up: nothing is served until this returns."""
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise RuntimeError("engine 'vllm' needs the vllm package (installed in the GPU image)") from exc
        args = AsyncEngineArgs(
            model=model,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        engine = AsyncLLMEngine.from_engine_args(args)
        tokenizer = engine.get_tokenizer()  # a coroutine in vLLM < 0.11, a plain call since
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer
        model_config = getattr(engine, "model_config", None)
        if model_config is None:
            model_config = await engine.get_model_config()
        context_length = int(model_config.max_model_len)
        log.info("vLLM engine started", extra={"model": model, "context_length": context_length})
        return cls(
            model_id=model_id,
            engine=engine,
            tokenizer=tokenizer,
            context_length=context_length,
            max_in_flight=max_in_flight,
        )

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def active_requests(self) -> int:
        # Two plain reads from the scrape thread: clamp a momentary skew.
        return max(0, self._in_flight - self._waiting)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model_id, engine=self.name, context_length=self._context_length)]

    async def count_tokens(self, model: str, messages: tuple[Message, ...]) -> int:
        check_model(model, self.model_id)
        return len(await self._tokenize(template_messages(messages, self.model_id)))

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request), self.model_id)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        if self._closed:
            raise EngineUnavailable("The inference engine is shutting down.")
        check_model(request.model, self.model_id)
        validate_sampling(request.sampling)
        reject_tools(request, self.model_id)
        prompt_ids = await self._tokenize(template_messages(request.messages, self.model_id))
        max_tokens = resolve_max_tokens(len(prompt_ids), request.sampling.max_tokens, self._context_length)
        if self._in_flight >= self.max_in_flight:
            raise QueueFull(f"The local model is busy: {self._in_flight} requests are in flight.", retry_after=1)

        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**sampling_kwargs(request.sampling, max_tokens), output_kind=RequestOutputKind.DELTA)
        # vLLM needs ids unique among requests in flight; a retried request id must not collide.
        vllm_id = f"{request.request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        completion = 0
        finish: FinishReason = "stop"
        self._in_flight += 1
        self._waiting += 1
        waiting = True
        try:
            # Closing this generator (client gone) makes vLLM abort the request.
            outputs = self._engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, vllm_id)
            try:
                async for output in outputs:
                    if waiting:
                        waiting = False
                        self._waiting -= 1
                    piece = output.outputs[0]
                    completion += len(piece.token_ids)
                    if piece.finish_reason is not None:
                        finish = "length" if piece.finish_reason == "length" else "stop"
                    if output.finished:
                        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion)
                        yield StreamChunk(text=piece.text, finish_reason=finish, usage=usage)
                        return
                    if piece.text:
                        yield StreamChunk(text=piece.text)
            finally:
                await outputs.aclose()
            raise EngineFailure("The vLLM engine ended a request without finishing it.")
        except (InferenceError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            log.exception("vLLM generation failed", extra={"request_id": request.request_id})
            raise _map_error(exc) from exc
        finally:
            if waiting:
                self._waiting -= 1
            self._in_flight -= 1

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shutdown = getattr(self._engine, "shutdown", None) or getattr(self._engine, "shutdown_background_loop", None)
        if shutdown is not None:
            shutdown()
        self._tokenize_pool.shutdown(wait=False)

    async def _tokenize(self, dicts: list[dict[str, Any]]) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._tokenize_sync, dicts)

    def _tokenize_sync(self, dicts: list[dict[str, Any]]) -> list[int]:
        try:
            prompt = self._tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}") from exc
        # The template wrote the special tokens already.
        return list(self._tokenizer.encode(prompt, add_special_tokens=False))
