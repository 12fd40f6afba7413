"""The API document (/openapi.json), made to say what the edge really does.

FastAPI writes most of it from the routes. What it cannot know is added here:

- the schemas of the bodies parsed by hand (orjson + pydantic: chat, embeddings, tokens,
  admin) and of the SSE chunk;
- the statuses every operation can answer whatever it does: 413 (the body limit is
  checked for every path), 500 (the last resort, in the envelope), and for every
  operation that needs a key 401 and 503 (the key store unreachable); the operations
  that need no key (health, readiness) say so with ``security: []``;
- no 422: validation errors are 400 in OpenAI's envelope;
- the ``X-Request-Id`` header on every response, ``Retry-After`` where it may come.

tests/test_edge_openapi.py runs schemathesis over the whole document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .middleware import AUTH_EXEMPT_PATHS
from .routing import ERROR_DESCRIPTIONS

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

_REQUEST_ID = {
    "description": "This request's id (a fresh uuid4 hex): the chat id, the budget reservation id, the "
    "audit entry's event_id. A client's own X-Request-Id is only logged",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying, when the refusal knows it",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_WWW_AUTHENTICATE = {"description": "Bearer", "required": False, "schema": {"type": "string"}}


def _error_response(status: int) -> dict[str, Any]:
    return {"description": ERROR_DESCRIPTIONS[status], "content": {"application/json": {"schema": ERROR_REF}}}


def _complete_operation(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)
    universal = [413, 500]
    if path in AUTH_EXEMPT_PATHS:
        operation["security"] = []
    else:
        universal += [401, 503]
    for status in universal:
        responses.setdefault(str(status), _error_response(status))
    for code, response in responses.items():
        headers = response.setdefault("headers", {})
        headers["X-Request-Id"] = _REQUEST_ID
        if code in ("429", "503"):
            headers["Retry-After"] = _RETRY_AFTER
        if code == "401":
            headers["WWW-Authenticate"] = _WWW_AUTHENTICATE


def build_openapi(app: FastAPI, schema_models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """The document of ``app``, with ``schema_models`` (bodies parsed by hand) among its components."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in schema_models:
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in model_schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = model_schema
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "An API key: sk-hoosh-..."}
    }
    schema["security"] = [{"bearer": []}]
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                _complete_operation(path, item[method])
    return schema


def install_openapi(app: FastAPI, schema_models: tuple[type[BaseModel], ...]) -> None:
    """Serve :func:`build_openapi`'s document (built once) as the app's /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, schema_models)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
