"""schemathesis hooks for test_edge_openapi.py: the rules of the API that no JSON Schema
can state, applied to the generated requests so that a valid one stays valid, and the
one kind of generated request a form cannot carry.

Behind the edge run the real services, so a valid chat or embedding request must also
name what exists in their state (a model some provider serves, a pool that exists):
generated values that are valid by the schema are steered there (values that break the
schema are left alone, so a negative case stays negative), and those requests go all the
way through the router to the provider stand-in. Transcriptions are not steered:
schemathesis cannot re-validate a body holding a file part, so any edit of one makes it a
negative case; the STT service answers them as they come (mostly 404, an unknown model),
and the real transcriptions are tested in test_edge_transcription.py and
test_edge_uploads.py.

The hooks under "known defects" keep generated values inside limits the API document
does not state yet; each is pinned by a strict xfail test in test_edge_openapi.py.
Remove the hook with the fix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import date
from typing import Any
from zoneinfo import available_timezones

import schemathesis
from hoosh_common.model_ids import model_id_problem

MAX_AMOUNT = 2**53 - 1  # what the budget stores exactly (Lua numbers are doubles)
INT64_MAX = 2**63 - 1
CHAT_MODEL = "gpt-4o"
EMBEDDING_MODEL = "text-embedding-3-small"
MAX_DIMENSIONS = 64
POOL = "default"  # kept: the run may not delete it (below)
POOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
ZONES = available_timezones()

Hook = Callable[[Any, Any], Any]


def _positive(case: Any) -> bool:
    meta = case.meta
    return meta is not None and meta.generation.mode.is_positive


def _map(path: str, method: str) -> Callable[[Hook], Hook]:
    """Register a ``map_case`` hook for one operation (a function registers once)."""

    def register(function: Hook) -> Hook:
        def hook(context: Any, case: Any) -> Any:
            return function(context, case)

        hook.__name__ = hook.__qualname__ = f"{function.__name__}_{method}_{path}"
        schemathesis.hook("map_case").apply_to(path=path, method=method)(hook)
        return function

    return register


@_map("/v1/admin/keys", "POST")
def expiry_in_the_future(context: Any, case: Any) -> Any:
    """A new key's ``expires_at`` must lie in the future (400 otherwise), which a schema
    cannot say: a generated one in the past is moved past now. A value that breaks the
    schema (negative, fractional, not a number) is left as it is."""
    body = case.body
    if isinstance(body, dict):
        expires = body.get("expires_at")
        if (
            isinstance(expires, int | float)
            and not isinstance(expires, bool)
            and expires == int(expires)
            and 0 <= expires <= time.time()
        ):
            case.body = {**body, "expires_at": int(time.time()) + 3600 + int(expires) % 1000}
    return case


def _served(body: Any, model: str) -> Any:
    """The body naming ``model`` and the kept pool where it names a valid model and pool."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("model"), str) and model_id_problem(body["model"]) is None:
        body["model"] = model
    if isinstance(body.get("pool"), str) and POOL_NAME.fullmatch(body["pool"]):
        body["pool"] = POOL
    return body


@_map("/v1/chat/completions", "POST")
def chat_a_served_model(context: Any, case: Any) -> Any:
    """A chat must name a model some provider serves (404 otherwise) and a pool that
    exists (400 pool_not_found): state, not schema."""
    case.body = _served(case.body, CHAT_MODEL)
    return case


@_map("/v1/embeddings", "POST")
def embed_with_a_served_model(context: Any, case: Any) -> Any:
    """As for chats; and no more ``dimensions`` than the model has (a provider refuses
    more; text-embedding-3-small has 1536: the stand-in, which builds any size, gets a few)."""
    body = _served(case.body, EMBEDDING_MODEL)
    dimensions = body.get("dimensions") if isinstance(body, dict) else None
    if isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions > MAX_DIMENSIONS:
        body["dimensions"] = 1 + dimensions % MAX_DIMENSIONS
    case.body = body
    return case


@_map("/v1/admin/pools", "POST")
def not_its_own_parent(context: Any, case: Any) -> Any:
    """A new pool cannot be its own parent (400), a rule between two fields that a schema
    cannot state: a generated pool naming itself as parent gets no parent."""
    body = case.body
    if isinstance(body, dict) and body.get("parent") is not None and body.get("parent") == body.get("name"):
        case.body = {**body, "parent": None}
    return case


@_map("/v1/audit", "GET")
def no_forged_cursor(context: Any, case: Any) -> Any:
    """A ``cursor`` is an opaque token the audit service issued (``next_cursor``); any other
    string is refused (400), which no schema can state: valid cases go without one."""
    query = case.query
    if _positive(case) and isinstance(query, dict) and "cursor" in query:
        case.query = {name: value for name, value in query.items() if name != "cursor"}
    return case


@schemathesis.hook("filter_case").apply_to(path="/v1/admin/pools/{name}", method="DELETE")
def keep_the_default_pool(context: Any, case: Any) -> bool:
    """The run may delete any pool but ``default``, which the chats above charge."""
    return (case.path_parameters or {}).get("name") != POOL


# --------------------------------------------------------------------------- rules no schema states


def _a_real_zone(context: Any, case: Any) -> Any:
    """A pool's ``timezone`` must be an IANA zone, which the document does not list (it
    says: any string of 1-64 characters; another is a 400 naming ``timezone``)."""
    body = case.body
    if _positive(case) and isinstance(body, dict):
        zone = body.get("timezone")
        if isinstance(zone, str) and 0 < len(zone) <= 64 and zone not in ZONES:
            case.body = {**body, "timezone": "Europe/Berlin"}
    return case


_map("/v1/admin/pools", "POST")(_a_real_zone)
_map("/v1/admin/pools/{name}", "PATCH")(_a_real_zone)


@_map("/v1/costs", "GET")
def days_and_dimensions(context: Any, case: Any) -> Any:
    """``start``/``end`` must be real days (the pattern admits 2026-13-45), in order and at
    most 400 days apart: rules no schema states."""
    query = case.query
    if _positive(case) and isinstance(query, dict):
        query = dict(query)
        for name in ("start", "end"):
            value = query.get(name)
            if isinstance(value, str):
                try:
                    date.fromisoformat(value)
                except ValueError:
                    query[name] = date.today().isoformat()
        today = date.today().isoformat()
        if isinstance(query.get("start"), str) and not isinstance(query.get("end"), str):
            query["start"] = min(query["start"], today)  # the default end is today
        if isinstance(query.get("end"), str) and not isinstance(query.get("start"), str):
            query["end"] = max(query["end"], today)  # the default start is 29 days before it
        if isinstance(query.get("start"), str) and isinstance(query.get("end"), str):
            first, last = sorted((query["start"], query["end"]))
            if (date.fromisoformat(last) - date.fromisoformat(first)).days >= 400:
                first = last
            query["start"], query["end"] = first, last
        case.query = query
    return case


def _lost_on_the_wire(mutation: Any) -> bool:
    # A field's JSON type (sent as its text, e.g. "false": a valid string), or the file's
    # `format: binary` (any bytes a file part carries are binary).
    return mutation.keywords == ("type",) or (
        mutation.keywords == ("format",) and mutation.schema_pointer.endswith("/properties/file")
    )


@schemathesis.hook("filter_case").apply_to(path="/v1/audio/transcriptions", method="POST")
def form_fields_are_text(context: Any, case: Any) -> bool:
    """Drop negative cases whose every violation a multipart form cannot carry: it sends each
    field as text, so a boolean ``false`` arrives as the valid string "false". schemathesis
    means to discount these itself, but cannot re-validate a body holding a binary file part."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_negative:
        return True
    mutations = getattr(meta.phase.data, "mutations", ()) or ()
    return not mutations or not all(_lost_on_the_wire(mutation) for mutation in mutations)
