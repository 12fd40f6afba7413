"""The GPU engine: vLLM's async engine behind the same interface as llama.cpp.

vLLM is imported only inside ``VllmEngine.start`` and the request path, so that nothing
else (the CPU image, the tests) needs it installed. The API used is vLLM's documented
one: ``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`` and
``engine.generate(prompt, SamplingParams, request_id)`` yielding ``RequestOutput``s
(with ``RequestOutputKind.DELTA``, each carries only the new text and token ids).

The prompt is tokenized with the chat template, never rendered to text and encoded
again: a Mistral-format tokenizer (vLLM's own for Mistral models) would read its
control tokens back as plain text. Where vLLM has its renderer (``engine.renderer``
with ``render_chat_async``: newer releases, 0.33 in the image) the messages go through
``render_chat_async`` as vLLM's own chat endpoint sends them, and its output, token ids
and all, is what ``generate`` is given (a raw ``TokensPrompt`` is deprecated there).
Without one (vLLM 0.11), the tokenizer's ``apply_chat_template(..., tokenize=True)``
gives the ids, sent as a ``TokensPrompt``. Either way the prompt token count we report
is the one the model saw.

A request that vLLM finishes with ``error`` raises ``EngineFailure`` (500), and one it
finishes with ``abort`` raises ``EngineUnavailable`` (503, worth a retry) unless hoosh
aborted it: a truncated answer must not pass for a complete one. hoosh aborts a request
when its caller goes away (the stream is closed or its task cancelled: vLLM's
``generate`` aborts it, and nobody is left to answer) and at ``close`` (the streams
still open get ``EngineUnavailable``).

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
from collections.abc import AsyncGenerator, Mapping, Sequence
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


# vLLM's chat endpoint renders a chat completion with these (add_generation_prompt
# defaults to true there, continue_final_message to false).
CHAT_TEMPLATE_KWARGS: dict[str, Any] = {"add_generation_prompt": True, "continue_final_message": False}


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _map_error(exc: Exception) -> InferenceError:
    """vLLM's exceptions by name, since vllm itself is imported lazily."""
    names = _names(exc)
    if names & {"EngineDeadError", "AsyncEngineDeadError"}:
        return EngineUnavailable("The vLLM engine is not running.")
    if "RetryableRequestError" in names:
        # A request-level failure vLLM says is safe to retry (e.g. a paused engine
        # turned it away on arrival): another attempt, here or elsewhere, may succeed.
        return EngineUnavailable("The vLLM engine could not take the request; retry it.", retry_after=1)
    if names & {"VLLMValidationError", "VLLMClientError", "ValueError"}:
        return InvalidRequest(str(exc))
    return EngineFailure("The local model failed while generating.")


def _token_ids(rendered: Any) -> list[int]:
    """The ids ``apply_chat_template(..., tokenize=True)`` returned: a list, or (newer
    transformers, which default to ``return_dict=True``) a mapping with ``input_ids``."""
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    ids = list(rendered)
    if ids and isinstance(ids[0], Sequence) and not isinstance(ids[0], str):
        ids = list(ids[0])  # a batch of one
    return [int(i) for i in ids]


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
        # vLLM's renderer where it has one (render_chat_async); None on vLLM 0.11.
        renderer = getattr(engine, "renderer", None)
        self._renderer = renderer if callable(getattr(renderer, "render_chat_async", None)) else None
        self._in_flight = 0
        self._waiting = 0  # in flight, no output from vLLM yet
        self._live: set[str] = set()  # vLLM request ids in flight
        self._aborted_by_us: set[str] = set()  # those hoosh aborted itself (close)
        self._closed = False
        # One thread: a Hugging Face tokenizer is not safe to share across threads,
        # and templating/tokenizing long prompts must not block the event loop.
        # (vLLM's renderer has its own executor; this one serves vLLM 0.11.)
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
        engine_args: Mapping[str, Any] | None = None,
    ) -> VllmEngine:
        """Load ``model`` (HF id or local path) into vLLM. Blocks while the weights load,
        which is fine at start-up: nothing is served until this returns. ``engine_args``
        are further ``AsyncEngineArgs`` fields."""
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise RuntimeError("engine 'vllm' needs the vllm package (installed in the GPU image)") from exc
        args = AsyncEngineArgs(
            model=model,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            **dict(engine_args or {}),
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
        prompt_ids, _ = await self._prompt(template_messages(messages, self.model_id))
        return len(prompt_ids)

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request), self.model_id)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        if self._closed:
            raise EngineUnavailable("The inference engine is shutting down.")
        check_model(request.model, self.model_id)
        validate_sampling(request.sampling)
        reject_tools(request, self.model_id)
        prompt_ids, prompt = await self._prompt(template_messages(request.messages, self.model_id))
        max_tokens = resolve_max_tokens(len(prompt_ids), request.sampling.max_tokens, self._context_length)
        if self._in_flight >= self.max_in_flight:
            raise QueueFull(f"The local model is busy: {self._in_flight} requests are in flight.", retry_after=1)
        if self._closed:
            raise EngineUnavailable("The inference engine is shutting down.")

        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**sampling_kwargs(request.sampling, max_tokens), output_kind=RequestOutputKind.DELTA)
        # vLLM needs ids unique among requests in flight; a retried request id must not collide.
        vllm_id = f"{request.request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        completion = 0
        self._in_flight += 1
        self._waiting += 1
        self._live.add(vllm_id)
        waiting = True
        try:
            # Closing this generator (client gone) makes vLLM abort the request.
            outputs = self._engine.generate(prompt, params, vllm_id)
            try:
                async for output in outputs:
                    if waiting:
                        waiting = False
                        self._waiting -= 1
                    piece = output.outputs[0]
                    completion += len(piece.token_ids)
                    finish = self._finish_reason(piece.finish_reason, vllm_id, request.request_id)
                    if output.finished:
                        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion)
                        yield StreamChunk(text=piece.text, finish_reason=finish or "stop", usage=usage)
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
            self._live.discard(vllm_id)
            self._aborted_by_us.discard(vllm_id)

    def _finish_reason(self, reason: object, vllm_id: str, request_id: str) -> FinishReason | None:
        """OpenAI's finish reason for vLLM's, or the error a failed request raises."""
        if reason is None:
            return None
        reason = str(reason)
        if reason == "length":
            return "length"
        if reason == "error":
            log.error("vLLM finished a request with an error", extra={"request_id": request_id})
            raise EngineFailure("The local model failed while generating.")
        if reason == "abort":
            if vllm_id in self._aborted_by_us:
                raise EngineUnavailable("The inference engine is shutting down.")
            # vLLM dropped it (paused, put to sleep, rescaled...): not an answer, and
            # worth another attempt, here or on another worker.
            log.error("vLLM aborted a request hoosh did not abort", extra={"request_id": request_id})
            raise EngineUnavailable("The local model dropped the request before it finished.", retry_after=1)
        return "stop"  # "stop" (EOS, a stop string or stop token), "repetition"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        live = sorted(self._live)
        if live:
            # Streams still open end now (EngineUnavailable), not when the engine is gone.
            self._aborted_by_us.update(live)
            try:
                await self._engine.abort(live)
            except Exception:
                log.warning("vLLM could not abort the requests in flight", exc_info=True)
        shutdown = getattr(self._engine, "shutdown", None) or getattr(self._engine, "shutdown_background_loop", None)
        if shutdown is not None:
            shutdown()
        self._tokenize_pool.shutdown(wait=False)

    async def _prompt(self, dicts: list[dict[str, Any]]) -> tuple[list[int], Any]:
        """The prompt's token ids, and the prompt to hand ``generate``."""
        if self._renderer is not None:
            return await self._render(dicts)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenize_pool, self._tokenize_sync, dicts)
        from vllm import TokensPrompt

        return ids, TokensPrompt(prompt_token_ids=ids)

    async def _render(self, dicts: list[dict[str, Any]]) -> tuple[list[int], Any]:
        """vLLM's renderer: the chat template applied (and tokenized) as vLLM's chat
        endpoint does, for this model's tokenizer. No length limit here: the context
        check is ``resolve_max_tokens``'s, worded as OpenAI's."""
        from vllm.renderers import ChatParams, TokenizeParams

        assert self._renderer is not None
        chat = ChatParams(chat_template_kwargs=dict(CHAT_TEMPLATE_KWARGS))
        tokenize = TokenizeParams(max_total_tokens=None, add_special_tokens=False)
        try:
            _, engine_inputs = await self._renderer.render_chat_async([dicts], chat, tokenize)
        except Exception as exc:
            # vLLM raises the template's own errors (raise_exception(), jinja2) as
            # VLLMValidationError, mistral_common's checks as ValueError.
            if _names(exc) & {"VLLMClientError", "ValueError", "TemplateError"}:
                raise InvalidRequest(f"The model's chat template rejected the messages: {exc}") from exc
            log.exception("vLLM could not render the messages")
            raise EngineFailure("The local model could not prepare the prompt.") from exc
        (engine_input,) = engine_inputs
        return [int(i) for i in engine_input["prompt_token_ids"]], engine_input

    def _tokenize_sync(self, dicts: list[dict[str, Any]]) -> list[int]:
        try:
            # tokenize=True: the template's control tokens become their ids. Rendering to
            # text and encoding again reads them back as text with a Mistral tokenizer.
            rendered = self._tokenizer.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True)
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            raise InvalidRequest(f"The model's chat template rejected the messages: {exc}") from exc
        return _token_ids(rendered)
