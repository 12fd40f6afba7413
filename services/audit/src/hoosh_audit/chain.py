"""The entry format of the audit chain.

Each entry is one line, the canonical JSON (sorted keys, no spaces, UTF-8) of

    {"event_id", "kid", "mac", "payload", "prev", "seq", "stream_seq", "subject", "ts_ms"}

where ``mac = HMAC-SHA256(key[kid], canonical JSON of the entry without "mac")`` and
``prev`` is the previous entry's mac (64 zeros before the first entry of the log).
Entries written before key ids existed have no ``kid`` and may only come first.

Because keys are sorted and ``"mac"`` sits between ``"kid"`` and ``"payload"``, the
MACed bytes are the line with its ``,"mac":"…"`` member taken out: verification
hashes the bytes as they are on disk instead of re-serialising the entry, and any
edited byte (outside the mac, which then no longer matches) breaks the MAC.

No framework imports: the writer, the service and the offline verifier use this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

import orjson

from hoosh_audit.keys import Keyring

GENESIS_MAC = "0" * 64
ENTRY_KEYS = frozenset({"seq", "ts_ms", "event_id", "subject", "stream_seq", "payload", "prev", "kid", "mac"})
LEGACY_ENTRY_KEYS = ENTRY_KEYS - {"kid"}
_MAC_MEMBER = b',"mac":"'
_PAYLOAD_MEMBER = b',"payload":'
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class NewEntry:
    """What the caller supplies for one entry; the log adds seq, ts_ms, prev, kid and mac."""

    event_id: str
    subject: str
    stream_seq: int
    payload: dict[str, Any]


def canonical(obj: Any) -> bytes:
    """The one serialization that is MACed and written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def compute_mac(key: bytes, entry_without_mac: dict[str, Any]) -> str:
    return hmac.new(key, canonical(entry_without_mac), hashlib.sha256).hexdigest()


def seal(keyring: Keyring, *, seq: int, ts_ms: int, item: NewEntry, prev: str) -> tuple[dict[str, Any], bytes]:
    """The entry for ``item`` at ``seq`` signed with the current key, and its line (no newline)."""
    entry: dict[str, Any] = {
        "seq": seq,
        "ts_ms": ts_ms,
        "event_id": item.event_id,
        "subject": item.subject,
        "stream_seq": item.stream_seq,
        "payload": item.payload,
        "prev": prev,
        "kid": keyring.current_id,
    }
    body = canonical(entry)
    mac = hmac.new(keyring.current, body, hashlib.sha256).hexdigest()
    # Keys are sorted and strings cannot hold a raw '"': the first ',"payload":' is
    # the entry's own member, and "mac" sorts right before it.
    at = body.index(_PAYLOAD_MEMBER)
    line = b"".join((body[:at], _MAC_MEMBER, mac.encode("ascii"), b'"', body[at:]))
    entry["mac"] = mac
    return entry, line


def parse_json(line: bytes) -> Any:
    """orjson, falling back to the standard parser for what orjson refuses (huge ints)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line.decode("utf-8"))


def check_line(
    line: bytes,
    keyring: Keyring,
    *,
    expected_seq: int | None,
    expected_prev: str | None,
    legacy_ok: bool,
) -> tuple[dict[str, Any] | None, str]:
    """Parse and check one line: fields, sequence, link, key id and MAC.

    ``expected_seq`` / ``expected_prev`` of None skip those checks (a page read out of
    the middle of the log). Returns (entry, "") when good; (entry or None, reason)
    otherwise, with the entry when the line at least parses as one.
    """
    try:
        entry = parse_json(line)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"line is not valid JSON ({exc.__class__.__name__})"
    if not isinstance(entry, dict):
        return None, "line is not a JSON object"
    keys = entry.keys()
    if keys == ENTRY_KEYS:
        legacy = False
    elif keys == LEGACY_ENTRY_KEYS:
        if not legacy_ok:
            return None, "entry has no key id (kid) after entries that have one"
        legacy = True
    else:
        return None, "entry does not have exactly the expected fields"
    if (
        type(entry["seq"]) is not int
        or type(entry["ts_ms"]) is not int
        or type(entry["stream_seq"]) is not int
        or not isinstance(entry["event_id"], str)
        or not isinstance(entry["subject"], str)
        or not isinstance(entry["payload"], dict)
        or not isinstance(entry["prev"], str)
        or not isinstance(entry["mac"], str)
        or (not legacy and not isinstance(entry["kid"], str))
    ):
        return None, "entry field has the wrong type"
    mac: str = entry["mac"]
    at = line.find(_MAC_MEMBER)
    end = at + len(_MAC_MEMBER) + 64
    if at < 0 or len(mac) != 64 or line[at + len(_MAC_MEMBER) : end] != mac.encode("ascii", "replace"):
        return entry, "line is not in canonical form (edited)"
    # The mac member must sit where sorting puts it, right before "payload": then the
    # line is the canonical form of the entry, and no reordered variant verifies.
    if line[end : end + 1 + len(_PAYLOAD_MEMBER)] != b'"' + _PAYLOAD_MEMBER or not _HEX.issuperset(mac):
        return entry, "line is not in canonical form (edited)"
    if expected_seq is not None and entry["seq"] != expected_seq:
        return entry, f"sequence broken: expected seq {expected_seq}, found {entry['seq']}"
    if expected_prev is not None and entry["prev"] != expected_prev:
        return entry, "prev does not match the previous entry's mac (chain broken)"
    body = line[:at] + line[end + 1 :]
    if legacy:
        candidates = keyring.secrets()
    else:
        secret = keyring.secret(entry["kid"])
        if secret is None:
            return entry, f"signed by an unknown key id {entry['kid']!r}"
        candidates = [secret]
    for secret in candidates:
        if hmac.compare_digest(hmac.new(secret, body, hashlib.sha256).hexdigest(), mac):
            return entry, ""
    return entry, "mac mismatch (entry edited or wrong key)"


def verify(path: str | os.PathLike[str], key: bytes | Keyring) -> Any:
    """Verify the log a path names, without a checkpoint; kept for older callers.

    ``path`` may be the log directory, its ``audit.jsonl`` (the link to the head
    segment: the whole log is verified) or a single pre-segment log file. Returns a
    ``hoosh_audit.verification.VerifyResult`` (valid, count, first_bad_seq, error).
    """
    from hoosh_audit.verification import verify_path  # the verifier builds on this module

    keyring = key if isinstance(key, Keyring) else Keyring.single(key)
    return verify_path(path, keyring)
