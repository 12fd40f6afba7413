"""Who may call a hoosh gRPC service: per-service tokens on the internal plane.

Every process that calls another hoosh service (the edge, the router) presents its own
token in each call's metadata (``authorization: Bearer <token>``, added by
:func:`hoosh_common.telemetry.request_metadata`, which every internal call already
uses). Every gRPC server knows its callers (``HOOSH_INTERNAL_CALLERS``:
``edge=<token>,router=sha256:<hex>``) and refuses any other call with
UNAUTHENTICATED before the request is even parsed; a known caller calling a method
reserved to others (the budget's pool administration is the edge's alone) gets
PERMISSION_DENIED. Health checks stay open: kubelet's gRPC probes carry no metadata.

The check runs in the server's one interceptor
(:class:`hoosh_common.metrics.GrpcMetricsInterceptor`): one SHA-256 of the presented
token and a dict lookup per call. Tokens are compared by their digests, so a server
given ``sha256:`` entries never holds a token it could present elsewhere.

Transport encryption and peer authentication come from mutual TLS where certificates
are configured (:mod:`hoosh_common.tls`); the token is checked either way.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_BEARER = "Bearer "
_IDENTITY = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A token shorter than this is a typo or a guessable word, not a credential.
MIN_TOKEN_LENGTH = 16

# The metadata this process adds to every internal call (empty: it presents none).
_outgoing: tuple[tuple[str, str], ...] = ()


def present_token(token: str | None) -> None:
    """Make every internal call this process makes carry ``token`` (None: none).
    One identity per process: each service's ``__main__`` calls it once at start."""
    global _outgoing
    if token is None:
        _outgoing = ()
        return
    check_token(token)
    _outgoing = ((AUTHORIZATION, _BEARER + token),)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The credentials pairs to add to an internal call's metadata."""
    return _outgoing


def check_token(token: str) -> str:
    if "$(" in token or "${" in token:
        # A Kubernetes $(VAR) or compose ${VAR} left unexpanded (defined after its use,
        # or not at all): a literal that would lock the real caller out, silently.
        raise ValueError("an internal token holds an unexpanded $(...) or ${...}: its variable was not defined")
    if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or any(c.isspace() or c == "," for c in token):
        raise ValueError(
            f"an internal token must be at least {MIN_TOKEN_LENGTH} printable characters without spaces "
            "or commas (generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def placeholder_token(token: str) -> bool:
    """A token copied from an example (``...change-me``, ``dev-...``) or of one repeated
    character: fine in development, refused in production."""
    lowered = token.lower()
    return "change-me" in lowered or "changeme" in lowered or lowered.startswith("dev-") or len(set(token)) <= 2


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_callers(text: str) -> dict[bytes, str]:
    """``HOOSH_INTERNAL_CALLERS``: comma-separated ``identity=token`` or
    ``identity=sha256:<hex of the token's SHA-256>``; an identity may appear more than
    once (an old and a new token while rotating). Returns digest -> identity."""
    callers: dict[bytes, str] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        identity, sep, secret = entry.partition("=")
        identity = identity.strip()
        if not sep or not _IDENTITY.match(identity):
            # The entry itself is not echoed: without its '=' it may be all token.
            raise ValueError(
                "HOOSH_INTERNAL_CALLERS entries are identity=token or identity=sha256:<hex> "
                "(identity: lowercase letters, digits, '-'); one entry is neither"
            )
        if secret.startswith("sha256:"):
            hex_digest = secret.removeprefix("sha256:").lower()
            if not _SHA256_HEX.match(hex_digest):
                raise ValueError(f"HOOSH_INTERNAL_CALLERS: {identity}'s sha256: value is not 64 hex digits")
            digest = bytes.fromhex(hex_digest)
        else:
            digest = token_digest(check_token(secret))
        if callers.get(digest, identity) != identity:
            raise ValueError(f"HOOSH_INTERNAL_CALLERS: {identity} and {callers[digest]} share a token")
        callers[digest] = identity
    return callers


@dataclass(frozen=True)
class Denial:
    code: grpc.StatusCode
    message: str


UNAUTHENTICATED = Denial(grpc.StatusCode.UNAUTHENTICATED, "this service accepts calls from hoosh services only")


@dataclass
class CallerPolicy:
    """A server's callers (digest -> identity) and, for some of them, the only methods
    they may call (identity -> full method names; an allow-list, so a method added
    later is closed to them until listed). A caller without a list may call every
    method."""

    callers: Mapping[bytes, str]
    limits: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.callers:
            raise ValueError("a caller policy needs at least one caller")
        self._denials: dict[tuple[str, str], Denial] = {}

    @property
    def identities(self) -> frozenset[str]:
        return frozenset(self.callers.values())

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The caller whose token the metadata carries, or None."""
        for key, value in metadata or ():
            if key == AUTHORIZATION:
                if not isinstance(value, str) or not value.startswith(_BEARER):
                    return None
                # A lookup by the digest: what an attacker controls is a SHA-256 preimage.
                return self.callers.get(token_digest(value[len(_BEARER) :]))
        return None

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Denial | None:
        identity = self.identify(metadata)
        if identity is None:
            return UNAUTHENTICATED
        allowed = self.limits.get(identity)
        if allowed is None or method in allowed:
            return None
        denial = self._denials.get((method, identity))
        if denial is None:  # one per (known method, known caller): bounded
            denial = Denial(grpc.StatusCode.PERMISSION_DENIED, f"{identity} may not call {method.rsplit('/', 1)[-1]}")
            self._denials[(method, identity)] = denial
        return denial


def caller_policy(
    callers_text: str | None,
    *,
    expected: Iterable[str],
    limits: Mapping[str, Iterable[str]] | None = None,
    service: str,
) -> CallerPolicy | None:
    """The server's policy from ``HOOSH_INTERNAL_CALLERS`` (None when unset: the plane is
    open, which only development allows; the caller warns). ``expected``: the
    identities that call this service in hoosh's design; another identity is logged (a
    typo there locks out the real caller). ``limits``: the only methods some callers
    may call (see :class:`CallerPolicy`)."""
    if not callers_text or not callers_text.strip():
        return None
    callers = parse_callers(callers_text)
    unknown = set(callers.values()) - set(expected)
    if unknown:
        log.warning(
            "HOOSH_INTERNAL_CALLERS names callers this service does not expect",
            extra={"service": service, "unexpected": sorted(unknown), "expected": sorted(expected)},
        )
    return CallerPolicy(callers, {identity: frozenset(allowed) for identity, allowed in (limits or {}).items()})
