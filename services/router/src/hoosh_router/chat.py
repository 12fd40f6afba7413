"""One chat completion, end to end: resolve, admit (the key's limits), reserve on the
pool chain (and look in the cache), call with retries and fallback, settle, publish.

The reservation holds the prompt plus as many completion tokens as every pool of the
chain affords, up to what the request asked for and at least 1; the granted count is
the ``max_tokens`` sent upstream, so no completion can outspend its pools. A call,
blocking or streamed, renews its lease every third of it while it runs.

Every reservation ends exactly once (settlement rules):
- success: commit the real usage (the provider's; for a stream without usage, the
  prompt count plus the streamed completion tokens, see ``_StreamState``);
- a cache hit: commit the original usage's tokens (``cache.charge_hits``), USD 0;
- a stream the client leaves (cancels, or stops reading) once its upstream call is
  open, on a provider that keeps generating and billing after hoosh hangs up (every
  HTTP provider): the client's stream ends at once, and a background task goes on
  reading the upstream stream for at most ``drain_seconds`` (never past the request's
  deadline) and about ``max_tokens`` pieces, to see the provider's own usage (hidden
  reasoning included) and commit it; when that does not come, the estimate below;
- a stream that fails, is cut, or is left on the local model (cancelling stops it):
  commit what was generated — the provider's usage if it reported one, else the
  reservation's prompt count plus the completion tokens received so far, visible or
  hidden reasoning, no more than were granted (exact for the local model);
- either way ``inference.failed`` with ``charged_tokens`` is recorded; if the backend
  had already finished when the client left, ``inference.completed`` with
  ``settlement = "client_disconnected"``;
- a request that ends (cancelled, timed out) while an upstream call it sent was never
  answered, or after a provider accepted a call (200) whose output then failed
  (oversized, malformed, an error event, cut before any token): commit the prompt
  count (the provider has read, and may bill, the prompt);
- any other failure (before any upstream call, or every call refused with an error
  status): release.
Every request publishes exactly one event. A stream is retried or failed over
only until its first token is on its way to the client; after that a failure
ends it with an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh_common.eventbus import Publisher
from opentelemetry import trace

from . import metrics
from .backends.base import CallParams, Completion, StreamPiece, native_responses
from .budget_client import Renewal
from .cache import ResponseCache
from .config import ProviderConfig
from .dispatch import Attempts, Dispatcher
from .errors import InvalidRequest, RouterError
from .estimate import prompt_token_bound
from .recording import Recorder, RequestInfo, ledger_line, priced, usage_of
from .routing import Route
from .streaming import UpstreamStream

log = logging.getLogger(__name__)

# Kept for importers of the spine's names.
__all__ = ["ChatService", "Publisher"]

ChunkMaker = Callable[..., router_pb2.ChatStreamResponse]

# How long a stream the client left is read on for the provider's usage (at most; never
# past the request's deadline), and how many pieces beyond the granted max_tokens
# (framing: the first tool-call delta, a split character) it may take.
DRAIN_SECONDS = 30.0
DRAIN_SLACK_PIECES = 16


@dataclass(slots=True)
class Plan:
    attempts: Attempts
    pool: str
    prompt_tokens: int
    max_tokens: int  # granted by the budget: what goes upstream
    wanted_tokens: int  # what the request would get with budget to spare
    reserved: int
    cache_key: str | None
    cached: router_pb2.ChatResponse | None

    @property
    def clamped(self) -> bool:
        """The budget cut max_tokens: the answer may be shorter than the request's own,
        so it must not be cached for requests that could afford the whole one."""
        return self.max_tokens < self.wanted_tokens


class StreamAccumulator:
    """Rebuilds the whole reply from stream pieces (for the response cache)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, chat_pb2.ToolCall] = {}

    def add(self, piece: StreamPiece) -> None:
        if piece.content is not None:
            self.text.append(piece.content)
        for delta in piece.tool_calls:
            call = self.calls.get(delta.index)
            if call is None:
                call = self.calls[delta.index] = chat_pb2.ToolCall(type="function")
            if delta.id:
                call.id = delta.id
            if delta.type:
                call.type = delta.type
            if delta.function.name:
                call.function.name = delta.function.name
            call.function.arguments += delta.function.arguments

    def message(self) -> chat_pb2.ChatMessage:
        message = chat_pb2.ChatMessage(role="assistant")
        if self.text or not self.calls:
            message.text = "".join(self.text)
        message.tool_calls.extend(self.calls[index] for index in sorted(self.calls))
        return message


class ChatService:
    def __init__(
        self,
        dispatcher: Dispatcher,
        recorder: Recorder,
        cache: ResponseCache | None = None,
        *,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self._dispatch = dispatcher
        self._recorder = recorder
        self._cache = cache
        self._drain_seconds = drain_seconds

    # -- planning -----------------------------------------------------------------

    async def _plan(self, request: router_pb2.ChatRequest, info: RequestInfo, deadline: float) -> Plan:
        if not request.model:
            raise InvalidRequest("model is required", param="model")
        if not request.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        candidates = self._dispatch.candidates(request.model)
        first = candidates[0]
        provider = first.provider
        try:
            prompt_tokens = await first.backend.count_prompt_tokens(request, first.upstream_model)
        except RouterError as error:
            if len(candidates) == 1 or not error.fallback:
                raise
            # The first candidate cannot count (its worker is down, say): size the
            # reservation by the byte bound and let dispatch try the others.
            prompt_tokens = prompt_token_bound(request)
        requested = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
        if requested is not None and requested < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        max_tokens = requested or provider.default_max_tokens
        if provider.max_tokens_limit:
            max_tokens = min(max_tokens, provider.max_tokens_limit)
        context_length = first.backend.context_length(first.upstream_model)
        if context_length:
            if requested is None:
                max_tokens = min(max_tokens, context_length - prompt_tokens)
            if max_tokens < 1 or prompt_tokens + max_tokens > context_length:
                raise InvalidRequest(
                    f"This model's maximum context length is {context_length} tokens. However, you requested "
                    f"{prompt_tokens + max(max_tokens, 0)} tokens ({prompt_tokens} in the messages, "
                    f"{max(max_tokens, 0)} in the completion). Please reduce the length of the messages or completion.",
                    param="messages",
                    code="context_length_exceeded",
                )
        await self._recorder.admit(info, prompt_tokens + max_tokens)
        cache_key = self._cache.key(request) if self._cache is not None and self._cache.cacheable(request) else None
        # Priced at the dearest candidate: a fallback must not outspend a USD cap either.
        reserve = self._recorder.reserve(
            info,
            prompt_tokens,
            completion_tokens=max_tokens,
            min_completion_tokens=1,
            input_price_micros=max(route.provider.chat_price(route.upstream_model).input for route in candidates),
            output_price_micros=max(route.provider.chat_price(route.upstream_model).output for route in candidates),
        )
        cached = None
        if cache_key is not None and self._cache is not None:
            # The lookup rides along with the reservation: no extra latency on a miss.
            hold, cached = await asyncio.gather(reserve, self._cache.get(cache_key))
            if cached is not None and self._cache.charge_hits and cached.usage.total_tokens > hold.tokens:
                cached = None  # the pool cannot pay for the whole answer: no free remainder, go upstream
            metrics.observe_cache(cached is not None)
        else:
            hold = await reserve
        granted = hold.completion_tokens
        return Plan(
            attempts=Attempts(
                candidates=candidates, deadline=deadline, tokens=prompt_tokens + granted, label=info.model_label
            ),
            pool=hold.pool,
            prompt_tokens=prompt_tokens,
            max_tokens=granted,
            wanted_tokens=max_tokens,
            reserved=hold.tokens,
            cache_key=cache_key,
            cached=cached,
        )

    def _info(self, request: router_pb2.ChatRequest, request_id: str, stream: bool, kind: str = "chat") -> RequestInfo:
        info = RequestInfo.of(
            request_id=request_id,
            model=request.model,
            pool=request.pool,
            user=request.user,
            stream=stream,
            kind=kind,
            caller=request.caller,
        )
        info.model_label = self._dispatch.router.metric_label(request.model)
        return info

    async def _fail(
        self, info: RequestInfo, plan: Plan | None, error: BaseException, charge: chat_pb2.Usage | None = None
    ) -> RouterError:
        attempts = plan.attempts if plan else None
        route = attempts.route if attempts else None
        if charge is None and plan is not None and plan.attempts.maybe_billed:
            # Sent and never usably answered: the provider read the prompt and may bill it.
            charge = usage_of(plan.prompt_tokens, 0)
        model = route.upstream_model if route else ""
        if charge is not None:
            priced(charge, route.provider if route else None, model)
        return await self._recorder.end_failed(
            info,
            error,
            provider=route.provider.name if route else "",
            attempts=attempts.count if attempts else 0,
            charge=charge,
            model=model,
        )

    def _settle(self, plan: Plan, usage: chat_pb2.Usage) -> None:
        """Replace the TPM estimate with the real usage (background)."""
        attempts = plan.attempts
        if attempts.route is not None and attempts.admission is not None:
            self._dispatch.limiter.correct(
                attempts.route.provider, attempts.admission, attempts.tokens, usage.total_tokens
            )

    async def _serve_hit(self, info: RequestInfo, plan: Plan, cached: router_pb2.ChatResponse) -> None:
        """A cache hit: no upstream call. The pool pays the original usage's tokens (by
        default; ``_plan`` served the hit only if the reservation covers them) at USD 0;
        the event has cached=true and the original usage."""
        route = self._provider_named(cached.provider)
        finish = cached.choices[0].finish_reason if cached.choices else "stop"
        charged = cached.usage.total_tokens if self._cache is not None and self._cache.charge_hits else 0
        # The ledger counts the hit's tokens (what the pool pays) at USD 0.
        ledger = ledger_line(route, cached.model, usage_of(cached.usage.prompt_tokens, cached.usage.completion_tokens))
        await self._recorder.end_completed(
            info,
            charged,
            lambda: self._recorder.completed(
                info,
                provider=route,
                usage=cached.usage,
                finish_reason=finish,
                attempts=0,
                cached=True,
                charged_tokens=charged,
            ),
            ledger=ledger if charged else None,
        )

    def _provider_named(self, name: str) -> ProviderConfig | None:
        for config, _ in self._dispatch.router.entries:
            if config.name == name:
                return config
        return None

    # -- blocking -------------------------------------------------------------------

    async def chat(
        self,
        request: router_pb2.ChatRequest,
        request_id: str,
        time_remaining: float | None = None,
        *,
        responses: dict[str, Any] | None = None,
    ) -> router_pb2.ChatResponse:
        """One blocking call. With ``responses`` (Respond: a Responses API body), a
        candidate whose provider speaks that API natively is sent it, and the reply
        carries the provider's response object (``response_json``); any other answers
        from the chat ``request``."""
        info = self._info(request, request_id, stream=False, kind="chat" if responses is None else "response")
        plan: Plan | None = None
        renewal: Renewal | None = None
        ended = False  # the request's one ending (commit + event) has begun
        try:
            plan = await self._plan(request, info, self._dispatch.deadline(time_remaining))
            if plan.cached is not None:
                ended = True
                await self._serve_hit(info, plan, plan.cached)
                reply = router_pb2.ChatResponse()
                reply.CopyFrom(plan.cached)
                reply.id, reply.created, reply.cache = f"chatcmpl-{request_id}", int(time.time()), "hit"
                reply.usage.cost_usd_micros = 0  # served from the cache: no provider was paid
                return reply

            async def call(route: Route, params: CallParams) -> Completion:
                native = native_responses(route.backend) if responses is not None else None
                if native is not None and responses is not None:
                    completion = await native.respond(responses, params)
                else:
                    completion = await route.backend.chat(request, params)
                # The attempt's span (current here while exported) gets what it answered.
                span = trace.get_current_span()
                if span.is_recording():
                    span.set_attributes(
                        {
                            "gen_ai.response.model": completion.model,
                            "gen_ai.usage.input_tokens": completion.prompt_tokens,
                            "gen_ai.usage.output_tokens": completion.completion_tokens,
                        }
                    )
                return completion

            # A call that outlasts a third of the lease renews it (a timer until then),
            # so its real commit never meets a reservation the expiry policy settled.
            assert info.hold is not None
            renewal = self._recorder.budget.keep_alive(info.hold)
            completion = await self._dispatch.run(plan.attempts, request_id, plan.max_tokens, call)
        except BaseException as error:
            if renewal is not None:
                renewal.cancel()
            if ended:  # cancelled while its (shielded) ending runs: that ending stands
                raise
            router_error = await self._fail(info, plan, error)
            if isinstance(error, asyncio.CancelledError):
                raise
            raise router_error from error
        if renewal is not None:
            renewal.cancel()
        route = plan.attempts.route
        assert route is not None
        info.response_model = completion.model or route.upstream_model
        info.upstream_started = plan.attempts.last_started
        usage = priced(
            usage_of(completion.prompt_tokens, completion.completion_tokens, completion.cached_tokens),
            route.provider,
            route.upstream_model,
        )
        usd = usage.cost_usd_micros

        def record() -> None:
            self._settle(plan, usage)
            self._recorder.completed(
                info,
                provider=route.provider,
                usage=usage,
                finish_reason=completion.finish_reason,
                attempts=plan.attempts.count,
                usd=usd,
            )

        await self._recorder.end_completed(
            info, usage.total_tokens, record, usd=usd, ledger=ledger_line(route.provider, route.upstream_model, usage)
        )
        reply = router_pb2.ChatResponse(
            id=f"chatcmpl-{request_id}",
            model=completion.model or request.model,
            created=int(time.time()),
            choices=[chat_pb2.Choice(index=0, message=completion.message, finish_reason=completion.finish_reason)],
            usage=usage,
            provider=route.provider.name,
            system_fingerprint=completion.system_fingerprint,
            cache="miss" if plan.cache_key else "",
        )
        if completion.native:
            # The provider's own response object: no chat choice, and nothing the cache
            # (which holds chat replies) could serve again.
            del reply.choices[:]
            reply.response_json = completion.native
            return reply
        if plan.cache_key is not None and self._cache is not None and not plan.clamped:
            self._cache.put(plan.cache_key, reply)
        return reply

    # -- streaming ------------------------------------------------------------------

    async def stream(
        self,
        request: router_pb2.ChatRequest,
        request_id: str,
        time_remaining: float | None = None,
        *,
        responses: dict[str, Any] | None = None,
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        """One stream. With ``responses`` (RespondStream), a native candidate streams the
        provider's own events, one message each (``response_event``), then the usage
        message; any other streams chat chunks."""
        info = self._info(request, request_id, stream=True, kind="chat" if responses is None else "response")
        plan: Plan | None = None
        state: _StreamState | None = None
        renewal: Renewal | None = None
        route: Route | None = None
        opened = _Opened(responses)
        chat_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        provider = ""
        cache_state = ""

        def chunk(delta: chat_pb2.Delta, finish: str = "") -> router_pb2.ChatStreamResponse:
            return router_pb2.ChatStreamResponse(
                id=chat_id,
                model=request.model,
                created=created,
                provider=provider,
                choices=[chat_pb2.ChunkChoice(index=0, delta=delta, finish_reason=finish)],
            )

        served_hit = False
        ended = False  # the request's one ending (commit + event) has begun
        message: router_pb2.ChatStreamResponse | None  # a chunk on its way out
        upstream: UpstreamStream | None  # the provider's stream, once one is open
        try:
            plan = await self._plan(request, info, self._dispatch.deadline(time_remaining))
            cache_state = "miss" if plan.cache_key else ""
            if plan.cached is not None:
                provider = plan.cached.provider
                # Settled before the replay: its first chunk already holds the whole answer.
                ended = True
                await self._serve_hit(info, plan, plan.cached)
                served_hit = True
                async for message in self._replay(plan.cached, chunk):
                    yield message
            else:
                assert info.hold is not None
                renewal = self._recorder.budget.keep_alive(info.hold)
                upstream = await self._dispatch.run(
                    plan.attempts,
                    request_id,
                    plan.max_tokens,
                    lambda route, params: opened.open(route, request, params),
                )
                route = plan.attempts.route
                assert route is not None
                provider = route.provider.name
                info.response_model = route.upstream_model
                info.upstream_started = plan.attempts.last_started
                state = _StreamState(collect=plan.cache_key is not None)
                try:
                    async for piece in upstream:
                        if piece.native is not None:
                            message = state.take_native(piece, chunk)
                        else:
                            message = state.take(piece, chunk)
                        if message is not None:
                            if info.first_token_at is None:
                                info.first_token_at = time.monotonic()
                            if cache_state:
                                message.cache, cache_state = cache_state, ""
                            yield message
                except BaseException as error:
                    # Tokens already left: no restart. A backend fault still counts against its health.
                    if isinstance(error, RouterError) and error.backend_fault:
                        await self._dispatch.health.record_failure(route.provider.name, error)
                    raise
                if state.first:  # nothing generated: still open the assistant turn
                    message = chunk(chat_pb2.Delta(role="assistant", content=""))
                    message.cache = cache_state
                    yield message
                if state.prompt_tokens is None or state.completion_tokens is None:
                    log.warning("stream ended without usage; estimating", extra={"provider": provider})
                usage = state.usage(plan)
                finish_reason = state.finish_reason or "stop"
                # The backend has finished: charge and record now, before the last chunks go
                # out, so a client that leaves at the finish chunk still pays for the work
                # done and exactly one event is recorded.
                ended = True
                await self._end_stream(info, plan, route, usage, finish_reason)
        except BaseException as error:
            if ended:  # cancelled while its (shielded) ending runs: that ending stands
                if renewal is not None:
                    renewal.cancel()
                raise
            upstream = opened.upstream
            if (
                isinstance(error, asyncio.CancelledError | GeneratorExit)
                and plan is not None
                and plan.attempts.route is not None
                and upstream is not None
                and upstream.bills_when_left
                and not upstream.ended
            ):
                # The client left while the provider still generates (and bills): its stream
                # ends now; the ending waits, in the background, for the provider's usage.
                self._recorder.spawn(
                    self._settle_left(
                        info,
                        plan,
                        plan.attempts.route,
                        state or _StreamState(collect=False),
                        upstream,
                        renewal,
                        error,
                        finished=state is not None and bool(state.finish_reason),
                    )
                )
                raise
            if renewal is not None:
                renewal.cancel()
            if upstream is not None:
                await upstream.close()
            if (
                state is not None
                and state.finish_reason
                and route is not None
                and plan is not None
                and isinstance(error, asyncio.CancelledError | GeneratorExit)
            ):
                # The backend had finished; only the last chunks had not gone out.
                await self._end_stream(
                    info, plan, route, state.usage(plan), state.finish_reason, settlement="client_disconnected"
                )
                raise
            # Tokens generated before the cut are paid for (exact for the local model).
            charge = state.usage(plan) if state is not None and plan is not None else None
            router_error = await self._fail(info, plan, error, charge)
            if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
                raise
            raise router_error from error
        if renewal is not None:
            renewal.cancel()
        if served_hit:
            assert plan is not None and plan.cached is not None
            if request.include_usage:
                hit_usage = chat_pb2.Usage()
                hit_usage.CopyFrom(plan.cached.usage)
                hit_usage.cost_usd_micros = 0  # served from the cache: no provider was paid
                yield router_pb2.ChatStreamResponse(
                    id=chat_id, model=request.model, created=created, usage=hit_usage, provider=provider
                )
            return
        assert plan is not None and state is not None
        if not state.native:  # a native stream's events end it; only the usage follows
            yield chunk(chat_pb2.Delta(), finish_reason)
        if (
            not state.native
            and plan.cache_key is not None
            and self._cache is not None
            and state.accumulator is not None
            and not plan.clamped
        ):
            self._cache.put(
                plan.cache_key,
                router_pb2.ChatResponse(
                    model=request.model,
                    choices=[
                        chat_pb2.Choice(index=0, message=state.accumulator.message(), finish_reason=finish_reason)
                    ],
                    usage=usage,
                    provider=provider,
                ),
            )
        if request.include_usage:
            yield router_pb2.ChatStreamResponse(
                id=chat_id, model=request.model, created=created, usage=usage, provider=provider
            )

    async def _settle_left(
        self,
        info: RequestInfo,
        plan: Plan,
        route: Route,
        state: _StreamState,
        upstream: UpstreamStream,
        renewal: Renewal | None,
        error: BaseException,
        *,
        finished: bool,
    ) -> None:
        """The ending of a stream its client left: read the rest of the upstream stream
        (bounded) for the provider's usage, then commit that — or, when it does not
        come, the prompt plus what was generated, hidden reasoning included — and record
        the one event. The lease is renewed until then."""
        cancelled = False
        try:
            seconds = min(self._drain_seconds, plan.attempts.deadline - time.monotonic())
            complete = await upstream.drain(state.count, seconds, plan.max_tokens + DRAIN_SLACK_PIECES)
        except asyncio.CancelledError:  # shutting down: settle with what is known
            cancelled, complete = True, False
        finally:
            if renewal is not None:
                renewal.cancel()
        if not complete or state.prompt_tokens is None or state.completion_tokens is None:
            log.warning(
                "a stream its client left gave no usage; charging the estimate",
                extra={"provider": route.provider.name, "request_id": info.request_id},
            )
        usage = state.usage(plan)
        if finished:
            await self._end_stream(
                info, plan, route, usage, state.finish_reason or "stop", settlement="client_disconnected"
            )
        else:
            await self._fail(info, plan, error, usage)
        if cancelled:
            raise asyncio.CancelledError

    async def _end_stream(
        self,
        info: RequestInfo,
        plan: Plan,
        route: Route,
        usage: chat_pb2.Usage,
        finish_reason: str,
        *,
        settlement: str = "",
    ) -> None:
        priced(usage, route.provider, route.upstream_model)
        usd = usage.cost_usd_micros

        def record() -> None:
            self._settle(plan, usage)
            self._recorder.completed(
                info,
                provider=route.provider,
                usage=usage,
                finish_reason=finish_reason,
                attempts=plan.attempts.count,
                usd=usd,
                settlement=settlement,
            )

        await self._recorder.end_completed(
            info, usage.total_tokens, record, usd=usd, ledger=ledger_line(route.provider, route.upstream_model, usage)
        )

    @staticmethod
    async def _replay(
        cached: router_pb2.ChatResponse, chunk: ChunkMaker
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        """A cached response as a stream: the whole text in one delta, then the tool calls, then the finish."""
        choice = cached.choices[0] if cached.choices else chat_pb2.Choice(message=chat_pb2.ChatMessage())
        message = choice.message
        first = chunk(chat_pb2.Delta(role="assistant"))
        first.cache = "hit"
        if message.WhichOneof("content") == "text" and (message.text or not message.tool_calls):
            first.choices[0].delta.content = message.text
        first.choices[0].delta.tool_calls.extend(
            chat_pb2.ToolCallDelta(
                index=index,
                id=call.id,
                type=call.type or "function",
                function=chat_pb2.FunctionCall(name=call.function.name, arguments=call.function.arguments),
            )
            for index, call in enumerate(message.tool_calls)
        )
        yield first
        yield chunk(chat_pb2.Delta(), choice.finish_reason or "stop")


class _StreamState:
    """Per-stream bookkeeping: role on the first delta, finish reason, usage, what was
    generated so far, cache copy."""

    __slots__ = (
        "accumulator",
        "cached_tokens",
        "completion_tokens",
        "finish_reason",
        "first",
        "generated",
        "native",
        "prompt_tokens",
    )

    def __init__(self, *, collect: bool) -> None:
        self.first = True
        self.finish_reason = ""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens = 0
        # Completion tokens received from the backend, hidden reasoning included: what each
        # piece says it carries, else its UTF-8 bytes (BPE never makes more tokens than bytes).
        self.generated = 0
        self.accumulator = StreamAccumulator() if collect else None
        self.native = False  # the provider's own Responses API events (RespondStream)

    def count(self, piece: StreamPiece) -> bool:
        """The bookkeeping of one piece; True when it carries generated tokens."""
        if piece.prompt_tokens is not None:
            self.prompt_tokens, self.completion_tokens = piece.prompt_tokens, piece.completion_tokens
            self.cached_tokens = piece.cached_tokens
        if piece.finish_reason:
            self.finish_reason = piece.finish_reason
        self.generated += piece.hidden_tokens  # reasoning: billed though never shown
        if piece.content is None and not piece.tool_calls:
            return piece.hidden_tokens > 0
        self.generated += piece.tokens if piece.tokens is not None else _byte_bound(piece)
        return True

    def take(self, piece: StreamPiece, chunk: ChunkMaker) -> router_pb2.ChatStreamResponse | None:
        """Count ``piece``; the chunk it makes for the client, if any."""
        self.count(piece)
        if piece.content is None and not piece.tool_calls:
            return None
        if self.accumulator is not None:
            self.accumulator.add(piece)
        delta = chat_pb2.Delta(tool_calls=piece.tool_calls)
        if piece.content is not None:
            delta.content = piece.content
        if self.first:
            delta.role = "assistant"
            self.first = False
        return chunk(delta)

    def take_native(self, piece: StreamPiece, chunk: ChunkMaker) -> router_pb2.ChatStreamResponse:
        """Count a native Responses API piece; the message passing its event on."""
        self.count(piece)
        self.native, self.first = True, False
        message = chunk(chat_pb2.Delta())
        del message.choices[:]
        message.response_event = piece.native or b""
        return message

    def usage(self, plan: Plan) -> chat_pb2.Usage:
        """The provider's usage if it reported one; else the reservation's prompt count
        plus the completion tokens generated so far, hidden reasoning included (no more
        than were granted)."""
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            return usage_of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        return usage_of(plan.prompt_tokens, min(self.generated, plan.max_tokens))


def _byte_bound(piece: StreamPiece) -> int:
    size = len(piece.content.encode()) if piece.content else 0
    for call in piece.tool_calls:
        size += len(call.function.name) + len(call.function.arguments.encode())
    return size


class _Opened:
    """The upstream stream of a request's current attempt: the one a client who leaves
    is drained from, or that is closed when the request ends otherwise."""

    __slots__ = ("responses", "upstream")

    def __init__(self, responses: dict[str, Any] | None = None) -> None:
        self.upstream: UpstreamStream | None = None
        self.responses = responses  # a Responses API body: native candidates are sent it

    async def open(self, route: Route, request: router_pb2.ChatRequest, params: CallParams) -> UpstreamStream:
        """Start a backend stream (read by its own task) up to its first token or its end.

        Failures until then are ordinary attempt failures (retried, failed over). A
        cancellation (the attempt timed out, or the client left) leaves the stream
        running, for the caller to close or drain."""
        if self.upstream is not None:
            self.upstream.close_soon()  # an earlier attempt that timed out
        native = native_responses(route.backend) if self.responses is not None else None
        pieces = (
            native.respond_stream(self.responses, params)
            if native is not None and self.responses is not None
            else route.backend.stream(request, params)
        )
        upstream = self.upstream = UpstreamStream(pieces, bills_when_left=route.backend.bills_abandoned_streams)
        try:
            await upstream.start()
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.upstream = None  # it has ended: nothing to drain or to close
            upstream.close_soon()
            raise
        return upstream
