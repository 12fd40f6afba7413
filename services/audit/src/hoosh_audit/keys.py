"""The HMAC keys of the audit chain: several may verify, one signs.

Every entry and checkpoint names the id of the key that signed it (``kid``), so the
signing key can change without breaking the chain: configure the new key as current
and keep the old ones for verification. A key configured without an id gets a
fingerprint id, ``k-`` + 12 hex digits of HMAC-SHA256(secret, a constant), which
names the key without revealing it (any entry's MAC already is such a value).

No framework imports: the service, the offline verifier and the CLI use this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hoosh_audit.errors import ConfigError

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FINGERPRINT_LABEL = b"hoosh.audit.key-id.v1"


def key_fingerprint(secret: bytes) -> str:
    """The id a key gets when none is configured: stable, and reveals nothing of it."""
    return "k-" + hmac.new(secret, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True)
class Keyring:
    """Key id -> secret, and the id of the key that signs new entries and checkpoints."""

    keys: Mapping[str, bytes]
    current_id: str
    _frozen: tuple[tuple[str, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring needs at least one key")
        for kid, secret in self.keys.items():
            if not KEY_ID_PATTERN.fullmatch(kid):
                raise ValueError(f"key id {kid!r} must be 1-64 of A-Z a-z 0-9 . _ -")
            if not secret:
                raise ValueError(f"key {kid!r} is empty")
        if self.current_id not in self.keys:
            raise ValueError(f"the current key id {self.current_id!r} is not among the keys")
        object.__setattr__(self, "_frozen", tuple(sorted(self.keys.items())))

    def __repr__(self) -> str:  # never the secrets
        return f"Keyring(ids={sorted(self.keys)}, current_id={self.current_id!r})"

    @classmethod
    def single(cls, secret: bytes, key_id: str | None = None) -> Keyring:
        """One key that both signs and verifies (id: ``key_id`` or its fingerprint)."""
        kid = key_id or key_fingerprint(secret)
        return cls({kid: secret}, kid)

    @property
    def current(self) -> bytes:
        return self.keys[self.current_id]

    def secret(self, key_id: str) -> bytes | None:
        return self.keys.get(key_id)

    def secrets(self) -> list[bytes]:
        """Every secret (entries written before key ids existed may be signed by any)."""
        return [secret for _, secret in self._frozen]


def _parse_keys_json(text: str, source: str) -> dict[str, bytes]:
    """``{"id": "secret", ...}`` or ``["secret", ...]`` (ids: fingerprints)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: not JSON ({exc.__class__.__name__})") from None
    keys: dict[str, bytes] = {}
    if isinstance(value, dict):
        for kid, secret in value.items():
            if not isinstance(secret, str) or not secret:
                raise ConfigError(f"{source}: the secret of key {kid!r} must be a non-empty string")
            keys[str(kid)] = secret.encode("utf-8")
    elif isinstance(value, list):
        for secret in value:
            if not isinstance(secret, str) or not secret:
                raise ConfigError(f"{source}: every secret must be a non-empty string")
            raw = secret.encode("utf-8")
            keys[key_fingerprint(raw)] = raw
    else:
        raise ConfigError(f'{source}: expected {{"key id": "secret", ...}} or ["secret", ...]')
    return keys


def load_keyring(
    *,
    key: str | None = None,
    key_id: str | None = None,
    keys_json: str | None = None,
    keys_file: Path | None = None,
    verify_only: bool = False,
) -> Keyring:
    """Merge the configured keys into one keyring.

    ``key`` (HOOSH_AUDIT_HMAC_KEY) is one secret, named ``key_id`` when given, else by
    its fingerprint, and is then the current key. ``keys_json`` / ``keys_file``
    (HOOSH_AUDIT_HMAC_KEYS / HOOSH_AUDIT_HMAC_KEYS_FILE) add more keys; without ``key``,
    ``key_id`` picks the current one among them (not needed when there is just one).
    The same id with two different secrets is an error. ``verify_only`` (a verifier,
    which signs nothing) does not need the current key named. Raises ``ConfigError``.
    """
    keys: dict[str, bytes] = {}

    def add(kid: str, secret: bytes, source: str) -> None:
        if kid in keys and not hmac.compare_digest(keys[kid], secret):
            raise ConfigError(f"{source}: key id {kid!r} is configured twice with different secrets")
        keys[kid] = secret

    if keys_file is not None:
        try:
            text = keys_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"HOOSH_AUDIT_HMAC_KEYS_FILE: cannot read {keys_file}: {exc.strerror}") from None
        for kid, secret in _parse_keys_json(text, "HOOSH_AUDIT_HMAC_KEYS_FILE").items():
            add(kid, secret, "HOOSH_AUDIT_HMAC_KEYS_FILE")
    if keys_json:
        for kid, secret in _parse_keys_json(keys_json, "HOOSH_AUDIT_HMAC_KEYS").items():
            add(kid, secret, "HOOSH_AUDIT_HMAC_KEYS")
    current: str | None = None
    if key:
        raw = key.encode("utf-8")
        current = key_id or key_fingerprint(raw)
        add(current, raw, "HOOSH_AUDIT_HMAC_KEY")
    elif key_id:
        if key_id not in keys:
            raise ConfigError(f"HOOSH_AUDIT_HMAC_KEY_ID: no configured key has the id {key_id!r}")
        current = key_id
    if not keys:
        raise ConfigError("HOOSH_AUDIT_HMAC_KEY: is required (or HOOSH_AUDIT_HMAC_KEYS / HOOSH_AUDIT_HMAC_KEYS_FILE)")
    if current is None:
        if len(keys) > 1 and not verify_only:
            raise ConfigError("HOOSH_AUDIT_HMAC_KEY_ID: several keys are configured; name the one that signs")
        current = min(keys)
    try:
        return Keyring(keys, current)
    except ValueError as exc:
        raise ConfigError(f"audit keys: {exc}") from None


def parse_publisher_keys(text: str, source: str = "HOOSH_AUDIT_PUBLISHER_KEYS") -> dict[str, bytes]:
    """The publishers' event-signing keys: ``kid=<hex>`` items separated by commas or
    whitespace (newlines in a file; ``#`` starts a comment there), e.g.
    ``router=<hex>,stt=<hex>,budget=<hex>``. A publisher whose key rotates appears
    under several ids (``router=<old>,router-2=<new>``) until its old events are drained.
    Each key is hex of at least 32 bytes. Raises ``ConfigError``."""
    from hoosh_common.eventbus import check_key_id, signing_key  # the publishers' own rules

    keys: dict[str, bytes] = {}
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    for item in re.split(r"[\s,]+", " ".join(lines)):
        if not item:
            continue
        kid, sep, hex_key = item.partition("=")
        if not sep:
            raise ConfigError(f"{source}: expected key-id=hex items, got {kid[:64]!r}")
        try:
            check_key_id(kid, "key id")
            secret = signing_key(hex_key, f"the key of {kid!r}")
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if kid in keys and not hmac.compare_digest(keys[kid], secret):
            raise ConfigError(f"{source}: key id {kid!r} is configured twice with different keys")
        keys[kid] = secret
    return keys
