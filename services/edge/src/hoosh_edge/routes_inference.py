"""The OpenAI inference routes: chat completions, embeddings, transcriptions, models.

Each checks the principal's scope before anything leaves the edge: the pool (default:
the key's first) and the model (its patterns, against the id as requested).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from hoosh.router.v1 import router_pb2
from hoosh.stt.v1 import stt_pb2
from hoosh_tenancy import KeyRecord
from starlette.responses import Response
from starlette.types import Receive

from .errors import NotFoundError
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelId,
    ModelList,
)
from .responses import EventStreamResponse, OrjsonResponse
from .routing import (
    BACKEND,
    EdgeState,
    annotate_span,
    edge,
    errors,
    grpc_metadata,
    json_body,
    parse_body,
    request_id,
    validate_json,
)
from .scopes import authorize_model, authorize_pool, principal_of
from .serving_chat import COST_HEADER, ChatStream, cache_headers
from .serving_transcription import TRANSCRIPTIONS_PATH, openapi_body, read_form, validate_form

router = APIRouter()

# One event of a streamed chat (OpenAPI 3.1: an event stream's schema describes each event).
CHAT_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/ChatCompletionChunk"},
                },
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/ErrorResponse"},
                },
            ]
        }
    },
}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **errors(400, 403, 404, 429, *BACKEND),
        200: {
            "description": "A chat.completion, or with stream=true an SSE stream of chat.completion.chunk "
            "events ending with `data: [DONE]` (a failure after the first chunk is one error event, then "
            "`data: [DONE]`)",
            "content": {"text/event-stream": {"schema": CHAT_EVENT_SCHEMA}},
        },
    },
    openapi_extra=json_body(ChatCompletionRequest),
    tags=["chat"],
)
async def create_chat_completion(request: Request) -> Response:
    """Create a chat completion (OpenAI wire format), blocking or streamed.

    Served by the app's chat fast path ahead of the framework; this route documents it."""
    return await serve_chat(
        edge(request), await request.body(), request_id(request), request.receive, principal_of(request)
    )


async def serve_chat(state: EdgeState, raw_body: bytes, rid: str, receive: Receive, principal: KeyRecord) -> Response:
    """Validate the body, check the key's pool and model, run the completion, and build
    its (JSON or SSE) response."""
    body = validate_json(raw_body, ChatCompletionRequest, max_depth=state.settings.edge_max_json_depth)
    pool = authorize_pool(principal, body.pool)
    authorize_model(principal, body.model)
    annotate_span(**{"hoosh.model": body.model, "hoosh.pool": pool})
    result = await state.chat.create(body, rid, receive, pool=pool, caller=principal.caller())
    if isinstance(result, ChatStream):
        return EventStreamResponse(result, headers=cache_headers(result.cache))
    return OrjsonResponse(result.body, headers=cache_headers(result.cache, result.cost_usd_micros))


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=errors(400, 403, 404, 429, *BACKEND),
    openapi_extra=json_body(EmbeddingRequest),
    tags=["embeddings"],
)
async def create_embeddings(request: Request) -> Response:
    """Embed text through any provider that offers embeddings (OpenAI wire format)."""
    body = await parse_body(request, EmbeddingRequest)
    principal = principal_of(request)
    pool = authorize_pool(principal, body.pool)
    authorize_model(principal, body.model)
    annotate_span(**{"hoosh.model": body.model, "hoosh.pool": pool})
    reply = await edge(request).embeddings.create(
        body, request_id(request), request.receive, pool=pool, caller=principal.caller()
    )
    return OrjsonResponse(reply, headers={COST_HEADER: str(reply["usage"]["cost_usd_micros"])})


def _model_card(model: router_pb2.Model | stt_pb2.Model) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by or "hoosh"}


async def _visible_models(request: Request) -> list[router_pb2.Model | stt_pb2.Model]:
    """The router's models, then the speech-to-text ones (an absent STT service adds none),
    as far as the key's model patterns allow."""
    state = edge(request)
    reply, speech = await asyncio.gather(
        state.clients.router.ListModels(
            router_pb2.ListModelsRequest(),
            metadata=grpc_metadata(request),
            timeout=state.settings.edge_rpc_timeout_seconds,
        ),
        state.transcription.models(),
    )
    models: list[router_pb2.Model | stt_pb2.Model] = list(reply.models)
    seen = {model.id for model in models}
    models += [model for model in speech if model.id not in seen]
    principal = principal_of(request)
    return [model for model in models if principal.allows_model(model.id)]


@router.get("/v1/models", response_model=ModelList, responses=errors(*BACKEND), tags=["models"])
async def list_models(request: Request) -> Response:
    """Every model the router can serve, and the speech-to-text models, that the key may use."""
    return OrjsonResponse({"object": "list", "data": [_model_card(m) for m in await _visible_models(request)]})


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=errors(400, 404, *BACKEND), tags=["models"])
async def retrieve_model(request: Request, model: ModelId) -> Response:
    """One model by id (ids may contain '/'); 404 for one the key may not use; 400 for an
    id no model can have (checked before the router is asked)."""
    for candidate in await _visible_models(request):
        if candidate.id == model:
            return OrjsonResponse(_model_card(candidate))
    raise NotFoundError(f"The model '{model}' does not exist", param="model", code="model_not_found")


@router.post(
    TRANSCRIPTIONS_PATH,
    responses={
        **errors(400, 403, 404, 413, 429, *BACKEND),
        200: {
            "description": "response_format json (default) or verbose_json: JSON; text, srt and vtt: text/plain",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/TranscriptionResponse"},
                            {"$ref": "#/components/schemas/TranscriptionVerboseResponse"},
                        ]
                    },
                },
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        503: {
            "model": ErrorResponse,
            "description": "Speech-to-text is at capacity or down, or this gateway holds as many uploads as it "
            "can (`upload_capacity`); see Retry-After",
        },
    },
    openapi_extra=openapi_body(),
    tags=["audio"],
)
async def create_transcription(request: Request) -> Response:
    """Transcribe audio into the input language (OpenAI's multipart form; files up to 25 MB).

    hoosh's extension: a ``pool`` form field names the token pool charged for the audio
    seconds (default: the key's first pool).
    """
    state = edge(request)
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else state.settings.edge_max_audio_bytes
    with state.uploads.hold(size):  # 503 upload_capacity when this process holds too much already
        form = await read_form(request, state.uploads)
        try:
            body, upload = validate_form(form)
            principal = principal_of(request)
            pool = authorize_pool(principal, body.pool)
            authorize_model(principal, body.model)
            annotate_span(**{"hoosh.model": body.model, "hoosh.pool": pool})
            return await state.transcription.create(
                body, upload, request_id(request), request.receive, pool=pool, caller=principal.caller()
            )
        finally:
            await form.close()  # removes the spooled upload
