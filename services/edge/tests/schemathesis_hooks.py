"""schemathesis hooks for test_edge_openapi.py: the rules of the API that no JSON Schema
can state, applied to the generated requests so that a valid one stays valid, and the
one kind of generated request a form cannot carry."""

from __future__ import annotations

import time
from typing import Any

import schemathesis


@schemathesis.hook("map_case").apply_to(path="/v1/admin/keys", method="POST")
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
