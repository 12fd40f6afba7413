"""The Responses API routes: create (blocking, SSE or background), retrieve, input
items, delete, cancel (a background one).

Create checks the key's pool and model as chat does, then runs through the chat path
(serving_responses.py). Stored responses belong to the key that created them: another
key (admin included) gets the same 404 as for an id that never existed or has expired.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from .errors import NotFoundError
from .protocol_responses import RESPONSE_ID_PATTERN, ResponseCreateRequest
from .responses import EventStreamResponse, OrjsonResponse
from .routing import BACKEND, annotate_span, edge, errors, json_body, parse_body, request_id
from .scopes import authorize_model, authorize_pool, principal_of, reservation_owner
from .serving_chat import cache_headers
from .serving_responses import ResponseStream

router = APIRouter()

RESPONSES_PATH = "/v1/responses"
_RESPONSE_ID = re.compile(RESPONSE_ID_PATTERN)

# One event of a streamed response: `event: <type>` and its JSON (OpenAI's ResponseStreamEvent).
RESPONSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's Response object (id resp_..., object response, output items, usage)",
}


def _owner(request: Request) -> str:
    return reservation_owner(principal_of(request))


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param="response_id", code="response_not_found")


def _checked_id(response_id: str) -> str:
    if not _RESPONSE_ID.fullmatch(response_id):
        raise _not_found(response_id)
    return response_id


@router.post(
    RESPONSES_PATH,
    responses={
        **errors(400, 403, 404, 429, *BACKEND),
        200: {
            "description": "A response object, or with stream=true an SSE stream of the Responses API's semantic "
            "events (response.created ... response.completed; a failure after the start is an `error` event, "
            "then response.failed)",
            "content": {
                "application/json": {"schema": _RESPONSE_SCHEMA},
                "text/event-stream": {"schema": RESPONSE_EVENT_SCHEMA},
            },
        },
    },
    openapi_extra=json_body(ResponseCreateRequest),
    tags=["responses"],
)
async def create_response(request: Request) -> Response:
    """Create a model response (OpenAI's Responses API), blocking or streamed, on any
    backend: served by translation onto chat. Function tools only; with store (the
    default) the response is kept for GET, input_items and previous_response_id."""
    state = edge(request)
    body = await parse_body(request, ResponseCreateRequest)
    principal = principal_of(request)
    pool = authorize_pool(principal, body.pool)
    authorize_model(principal, body.model)
    annotate_span(**{"hoosh.model": body.model, "hoosh.pool": pool})
    result = await state.responses.create(
        body, request_id(request), request.receive, owner=_owner(request), pool=pool, caller=principal.caller()
    )
    if isinstance(result, ResponseStream):
        return EventStreamResponse(result, headers=cache_headers(result.cache))
    return OrjsonResponse(result.body, headers=cache_headers(result.cache, result.cost_usd_micros))


@router.get(
    RESPONSES_PATH + "/{response_id}",
    responses={**errors(404), 200: {"content": {"application/json": {"schema": _RESPONSE_SCHEMA}}}},
    tags=["responses"],
)
async def retrieve_response(request: Request, response_id: str) -> Response:
    """A stored response of this key (404 for another key's, a deleted or an expired one)."""
    stored = await edge(request).responses.get(_checked_id(response_id), _owner(request))
    return OrjsonResponse(stored.response)


@router.get(
    RESPONSES_PATH + "/{response_id}/input_items",
    responses={**errors(400, 404), 200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
    tags=["responses"],
)
async def list_input_items(
    request: Request,
    response_id: str,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> Response:
    """The input items of a stored response of this key (OpenAI's ResponseItemList)."""
    stored = await edge(request).responses.get(_checked_id(response_id), _owner(request))
    items = list(stored.input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return OrjsonResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else "",
            "last_id": page[-1]["id"] if page else "",
            "has_more": len(items) > limit,
        }
    )


@router.delete(
    RESPONSES_PATH + "/{response_id}",
    responses={**errors(404), 200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
    tags=["responses"],
)
async def delete_response(request: Request, response_id: str) -> Response:
    """Delete a stored response of this key."""
    if not await edge(request).responses.store.delete(_checked_id(response_id), _owner(request)):
        raise _not_found(response_id)
    return OrjsonResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.post(
    RESPONSES_PATH + "/{response_id}/cancel",
    responses={**errors(400, 404), 200: {"content": {"application/json": {"schema": _RESPONSE_SCHEMA}}}},
    tags=["responses"],
)
async def cancel_response(request: Request, response_id: str) -> Response:
    """Cancel a background response of this key (on whichever edge runs it): status
    cancelled. A cancelled one answers as it is; a finished or non-background one is a 400."""
    responses = edge(request).responses
    stored = await responses.get(_checked_id(response_id), _owner(request))
    return OrjsonResponse(await responses.background.cancel(stored))
