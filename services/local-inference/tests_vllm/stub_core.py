"""The one part of vLLM these tests replace: the engine core (scheduler, model runner,
GPU) behind ``AsyncLLM``.

The seam is ``EngineCoreClient.make_async_mp_client``, the factory ``AsyncLLM.__init__``
calls for the client of its engine-core process. ``installed`` swaps it for one that
returns a ``StubEngineCore``, in process: everything in front of it is vLLM's own and
runs as in production (``AsyncLLM``, the renderer and tokenizer, ``InputProcessor``, the
``OutputProcessor`` with its incremental detokenizer and stop strings, the output
handler task, ``abort`` and ``shutdown``), and it speaks the same messages as the real
client: ``EngineCoreRequest`` in, ``EngineCoreOutputs`` (token ids, finish reasons) out.

The stub emits one token per request per step from ``tokens`` (by default, what
``plan`` says for the request: the ids of ``reply`` in the model's tokenizer), finishing
a request as vLLM's scheduler does (``check_stop``: its EOS id, a stop token id,
``max_tokens``, the context length), or with the reason a test scripts (``error``,
``abort``), and it records what it was sent: requests, aborts, shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from vllm.outputs import RequestError
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason
from vllm.v1.engine.core_client import EngineCoreClient
from vllm.v1.engine.exceptions import EngineDeadError


@dataclass
class Plan:
    """What the stub does with one request: emit ``tokens`` one a step, then finish
    (by vLLM's rules, or with ``finish`` after ``finish_after`` tokens); ``hold_after``:
    stop emitting after that many tokens until ``release`` is set."""

    tokens: list[int]
    finish: FinishReason | None = None
    finish_after: int | None = None
    hold_after: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    reject: RequestError | None = None  # turned away on arrival (e.g. by a paused engine)


class StubEngineCore(EngineCoreClient):
    """``AsyncMPClient``'s stand-in (the calls ``AsyncLLM`` makes on it)."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.resources = SimpleNamespace(engine_dead=False)  # AsyncLLM.errored reads it
        self.engine_ranks_managed = [0]
        self.plan: Callable[[EngineCoreRequest], Plan] = lambda request: Plan(tokens=[])
        self.requests: list[EngineCoreRequest] = []
        self.aborted: list[str] = []
        self.finished: dict[str, FinishReason] = {}
        self.shutdown_calls = 0
        self.dead: BaseException | None = None
        self._died = asyncio.Event()
        self._outputs: asyncio.Queue[EngineCoreOutputs] = asyncio.Queue()
        self._running: dict[str, asyncio.Task[None]] = {}

    # ---------------------------------------------------------------- what AsyncLLM calls
    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        self._check_alive()
        self.requests.append(request)
        plan = self.plan(request)
        self._running[request.request_id] = asyncio.create_task(self._run(request, plan))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        for request_id in request_ids:
            task = self._running.pop(request_id, None)
            if task is not None:
                task.cancel()

    async def get_output_async(self) -> EngineCoreOutputs:
        self._check_alive()
        getter = asyncio.ensure_future(self._outputs.get())
        dead = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait({getter, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (getter, dead):
                task.cancel()
        self._check_alive()
        return getter.result()

    def shutdown(self, timeout: float | None = None) -> None:
        self.shutdown_calls += 1
        for task in self._running.values():
            task.cancel()
        self._running.clear()

    # ---------------------------------------------------------------- what tests call
    def die(self) -> None:
        """The engine-core process died: the next read fails as the real client's does."""
        self.dead = EngineDeadError()
        self.resources.engine_dead = True
        self._died.set()

    @property
    def running(self) -> set[str]:
        return {rid for rid, task in self._running.items() if not task.done()}

    # ---------------------------------------------------------------- the "model"
    async def _run(self, request: EngineCoreRequest, plan: Plan) -> None:
        params = request.sampling_params
        assert params is not None
        prompt_len = len(request.prompt_token_ids or ())
        # vLLM 0.33 keeps the EOS id in the sampling parameters, 0.11 on the request.
        eos = getattr(params, "eos_token_id", getattr(request, "eos_token_id", None))
        emitted = 0
        try:
            if plan.reject is not None:
                output = EngineCoreOutput(
                    request_id=request.request_id, new_token_ids=[], finish_reason=FinishReason.ERROR, error=plan.reject
                )
                self._outputs.put_nowait(EngineCoreOutputs(outputs=[output]))
                return
            for token in plan.tokens:
                if plan.hold_after is not None and emitted == plan.hold_after:
                    await plan.release.wait()
                await asyncio.sleep(0.001)  # a decode step
                emitted += 1
                finish = self._check_stop(token, emitted, prompt_len, params, eos)
                if plan.finish_after is not None and emitted >= plan.finish_after:
                    finish = plan.finish
                self._emit(request.request_id, [token], finish)
                if finish is not None:
                    return
            # The plan ran out: finish with what was scripted, else as if EOS came.
            self._emit(request.request_id, [], plan.finish or FinishReason.STOP)
        finally:
            self._running.pop(request.request_id, None)

    def _check_stop(
        self, token: int, emitted: int, prompt_len: int, params: Any, eos: int | None
    ) -> FinishReason | None:
        """vLLM's scheduler's ``check_stop``: EOS, a stop token id, max_tokens, the context."""
        if token == eos or token in (params.stop_token_ids or ()):
            return FinishReason.STOP
        if prompt_len + emitted >= self.max_model_len or emitted >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _emit(self, request_id: str, tokens: list[int], finish: FinishReason | None) -> None:
        if finish is not None:
            self.finished[request_id] = finish
        output = EngineCoreOutput(request_id=request_id, new_token_ids=tokens, finish_reason=finish)
        self._outputs.put_nowait(EngineCoreOutputs(outputs=[output]))

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead


@contextlib.contextmanager
def installed(cores: list[StubEngineCore]) -> Iterator[None]:
    """While open, every ``AsyncLLM`` built gets a ``StubEngineCore`` (appended to
    ``cores``) instead of an engine-core process."""
    original = EngineCoreClient.__dict__["make_async_mp_client"]

    def make_async_mp_client(vllm_config: Any, executor_class: Any, log_stats: bool, *args: Any, **kwargs: Any) -> Any:
        core = StubEngineCore(vllm_config)
        cores.append(core)
        return core

    EngineCoreClient.make_async_mp_client = staticmethod(make_async_mp_client)  # type: ignore[method-assign]
    try:
        yield
    finally:
        EngineCoreClient.make_async_mp_client = original  # type: ignore[method-assign]
