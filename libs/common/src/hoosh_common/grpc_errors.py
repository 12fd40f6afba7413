"""How hoosh services carry an OpenAI-style error through gRPC: trailing metadata
``hoosh-error-type``, ``hoosh-error-code``, ``hoosh-error-param`` and ``retry-after``
beside the status code. The edge reads them back into the error envelope."""

from __future__ import annotations

from collections.abc import Iterable

ERROR_TYPE = "hoosh-error-type"
ERROR_CODE = "hoosh-error-code"
ERROR_PARAM = "hoosh-error-param"
RETRY_AFTER = "retry-after"


def error_metadata(
    error_type: str, code: str | None, param: str | None = None, retry_after: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The trailing metadata for one error (empty fields left out)."""
    pairs = [(ERROR_TYPE, error_type)]
    if code:
        pairs.append((ERROR_CODE, code))
    if param:
        pairs.append((ERROR_PARAM, param))
    if retry_after is not None:
        pairs.append((RETRY_AFTER, str(retry_after)))
    return tuple(pairs)


def metadata_dict(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """gRPC metadata (trailing or invocation) as a dict of lower-case keys to text."""
    out: dict[str, str] = {}
    for key, value in pairs or ():
        out[key.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out
