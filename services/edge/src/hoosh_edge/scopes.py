"""What a principal may do (docs/tenancy.md's scopes table), as cheap checks that raise
403 in OpenAI's shape (``invalid_request_error``; code ``pool_not_allowed``,
``model_not_allowed`` or ``insufficient_scope``)."""

from __future__ import annotations

from hoosh_tenancy import KeyRecord
from starlette.requests import Request

from .errors import PermissionDeniedError


def principal_of(request: Request) -> KeyRecord:
    """The principal EdgeMiddleware authenticated (every route outside health and docs)."""
    principal: KeyRecord = request.state.principal
    return principal


def require_admin(principal: KeyRecord) -> None:
    if not principal.is_admin:
        raise PermissionDeniedError("This route needs an admin key.", code="insufficient_scope")


def admin_only(request: Request) -> None:
    """Route dependency of the admin routers: 403 ``insufficient_scope`` unless admin."""
    require_admin(principal_of(request))


def authorize_pool(principal: KeyRecord, pool: str | None, *, param: str = "pool") -> str:
    """The pool to charge (the key's default when none is named); 403 when the key may not."""
    resolved = pool or principal.default_pool
    if not principal.allows_pool(resolved):
        raise PermissionDeniedError(
            f"This API key may not use the pool '{resolved}'.", param=param, code="pool_not_allowed"
        )
    return resolved


def authorize_model(principal: KeyRecord, model: str, *, param: str = "model") -> None:
    """403 unless the key's model list allows ``model`` (as requested, ``provider/model`` included)."""
    if not principal.allows_model(model):
        raise PermissionDeniedError(
            f"This API key may not use the model '{model}'.", param=param, code="model_not_allowed"
        )


def pool_filter(principal: KeyRecord) -> list[str]:
    """ListPools ``names``: the key's pools, or empty (every pool) for admin and ``'*'``."""
    return [] if principal.all_pools else list(principal.pools)


# The owner of open mode's anonymous reservations. Never empty: the budget reads an
# empty owner on Commit/Release as "no owner check" (admin only).
ANONYMOUS_OWNER = "anonymous"


def reservation_owner(principal: KeyRecord) -> str:
    """The owner a manual reservation records (Reserve): the key id, never empty."""
    return principal.id or ANONYMOUS_OWNER


def ending_owner(principal: KeyRecord) -> str:
    """The owner Commit/Release must match: empty (any manual reservation) only for admin."""
    return "" if principal.is_admin else reservation_owner(principal)


def audit_filter(principal: KeyRecord) -> str:
    """ListEntries ``key_id``: the key's own id, or empty (every entry) for admin.

    The anonymous principal of open mode has the empty id: on a loopback-only gateway
    it sees every entry, as the operator at that machine would."""
    return "" if principal.is_admin else principal.id
