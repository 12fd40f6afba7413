"""Embeddings, end to end: resolve (embedding models only), admit (the key's limits),
reserve the prompt-token bound on the pool chain, call with retries and fallback,
commit the real prompt tokens, publish an event of kind "embedding". Same guarantees
and settlement rules as chat: one reservation ended once (a call sent and never
answered pays the bound), one event per request."""

from __future__ import annotations

import asyncio

from hoosh.router.v1 import router_pb2

from .backends.base import CallParams, EmbeddingResult
from .budget_client import Renewal
from .dispatch import Attempts, Dispatcher
from .errors import InvalidRequest
from .estimate import PER_MESSAGE_OVERHEAD
from .recording import Recorder, RequestInfo, ledger_line, priced, usage_of
from .routing import Route

MAX_INPUTS = 2048


def embedding_token_bound(texts: list[str]) -> int:
    """At most one token per UTF-8 byte, plus a little framing per input."""
    return sum(len(text.encode()) + PER_MESSAGE_OVERHEAD for text in texts)


class EmbeddingService:
    def __init__(self, dispatcher: Dispatcher, recorder: Recorder) -> None:
        self._dispatch = dispatcher
        self._recorder = recorder

    async def embed(
        self, request: router_pb2.EmbedRequest, request_id: str, time_remaining: float | None = None
    ) -> router_pb2.EmbedResponse:
        info = RequestInfo.of(
            request_id=request_id,
            model=request.model,
            pool=request.pool,
            user=request.user,
            stream=False,
            kind="embedding",
            caller=request.caller,
        )
        info.model_label = self._dispatch.router.metric_label(request.model, "embedding")
        attempts: Attempts | None = None
        renewal: Renewal | None = None
        estimate = 0
        texts = list(request.input)
        dimensions = request.dimensions if request.HasField("dimensions") else None
        try:
            if not request.model:
                raise InvalidRequest("model is required", param="model")
            if not texts:
                raise InvalidRequest("input must not be empty", param="input")
            if len(texts) > MAX_INPUTS:
                raise InvalidRequest(f"input may hold at most {MAX_INPUTS} items", param="input")
            if dimensions is not None and dimensions < 1:
                raise InvalidRequest("dimensions must be at least 1", param="dimensions")
            candidates = self._dispatch.candidates(request.model, "embedding")
            estimate = embedding_token_bound(texts)
            await self._recorder.admit(info, estimate)
            await self._recorder.reserve(
                info,
                estimate,
                input_price_micros=max(r.provider.embedding_price(r.upstream_model).input for r in candidates),
            )
            deadline = self._dispatch.deadline(time_remaining)
            attempts = Attempts(
                candidates=candidates, deadline=deadline, tokens=estimate, kind="embedding", label=info.model_label
            )

            async def call(route: Route, params: CallParams) -> EmbeddingResult:
                return await route.backend.embed(texts, dimensions, params)

            assert info.hold is not None
            renewal = self._recorder.budget.keep_alive(info.hold)  # a long batch keeps its reservation
            result = await self._dispatch.run(attempts, request_id, 0, call)
            info.upstream_started = attempts.last_started
        except BaseException as error:
            if renewal is not None:
                renewal.cancel()
            route = attempts.route if attempts else None
            # Sent and never answered: the provider may bill the input; it pays the bound.
            charge = usage_of(estimate, 0) if attempts is not None and attempts.maybe_billed else None
            model = route.upstream_model if route else ""
            if charge is not None:
                priced(charge, route.provider if route else None, model, embedding=True)
            router_error = await self._recorder.end_failed(
                info,
                error,
                provider=route.provider.name if route else "",
                attempts=attempts.count if attempts else 0,
                charge=charge,
                model=model,
            )
            if isinstance(error, asyncio.CancelledError):
                raise
            raise router_error from error
        if renewal is not None:
            renewal.cancel()
        route = attempts.route
        assert route is not None
        # Providers that do not report usage are charged the (upper) estimate.
        prompt_tokens = result.prompt_tokens if result.prompt_tokens is not None else estimate
        usage = priced(usage_of(prompt_tokens, 0), route.provider, route.upstream_model, embedding=True)
        usd = usage.cost_usd_micros

        def record() -> None:
            if attempts.admission is not None:
                self._dispatch.limiter.correct(route.provider, attempts.admission, estimate, prompt_tokens)
            self._recorder.completed(
                info, provider=route.provider, usage=usage, finish_reason="", attempts=attempts.count, usd=usd
            )

        await self._recorder.end_completed(
            info, prompt_tokens, record, usd=usd, ledger=ledger_line(route.provider, route.upstream_model, usage)
        )
        return router_pb2.EmbedResponse(
            model=result.model or request.model,
            data=[router_pb2.Embedding(index=index, values=vector) for index, vector in enumerate(result.vectors)],
            usage=usage,
            provider=route.provider.name,
        )
