"""Signed checkpoints of the log's head, kept outside the log (in Redis).

A chain alone cannot show that entries were cut off its end, or that the whole log
was deleted: what is left still verifies. After every fsynced batch the service
writes the head it reached,

    {"kind": "hoosh.audit.checkpoint", "v": 1, "seq": 1234, "mac": "<head entry's mac>",
     "segment": "seg-000000001201.jsonl", "ts_ms": 1700000000000, "kid": "k-…", "sig": "<hex>"}

with ``sig = HMAC-SHA256(key[kid], canonical JSON without "sig")``, to one Redis key.
A log that ends before the checkpoint's ``seq``, or whose entry ``seq`` has another
mac, has lost entries or was rewritten. The key only moves forward: a write that
would move it back (or to another mac at the same seq) is refused and the stored
checkpoint stays as evidence.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hoosh_audit import metrics
from hoosh_audit.chain import canonical
from hoosh_audit.errors import CheckpointConflict, CheckpointError
from hoosh_audit.keys import Keyring

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "hoosh.audit.checkpoint"
CHECKPOINT_VERSION = 1
_FIELDS = frozenset({"kind", "v", "seq", "mac", "segment", "ts_ms", "kid", "sig"})


def checkpoint_key(prefix: str, stream: str, consumer: str) -> str:
    """The Redis key of a log's checkpoint: one per stream and durable consumer."""
    return f"{prefix}{stream}:{consumer}:checkpoint"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    mac: str
    segment: str
    ts_ms: int
    kid: str
    sig: str

    def body(self) -> dict[str, Any]:
        return {
            "kind": CHECKPOINT_KIND,
            "v": CHECKPOINT_VERSION,
            "seq": self.seq,
            "mac": self.mac,
            "segment": self.segment,
            "ts_ms": self.ts_ms,
            "kid": self.kid,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "sig": self.sig}

    def to_json(self) -> str:
        return canonical(self.to_dict()).decode("utf-8")

    @classmethod
    def sign(cls, keyring: Keyring, *, seq: int, mac: str, segment: str, ts_ms: int) -> Checkpoint:
        unsigned = cls(seq, mac, segment, ts_ms, keyring.current_id, "")
        sig = hmac.new(keyring.current, canonical(unsigned.body()), hashlib.sha256).hexdigest()
        return cls(seq, mac, segment, ts_ms, keyring.current_id, sig)

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        """A checkpoint from its JSON; ``CheckpointError`` if it is not one (the signature
        is not checked here: see ``signature_error``)."""
        try:
            value = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint is not JSON ({exc.__class__.__name__})") from None
        if not isinstance(value, dict) or set(value) != _FIELDS:
            raise CheckpointError("the checkpoint does not have exactly the expected fields")
        if value["kind"] != CHECKPOINT_KIND or value["v"] != CHECKPOINT_VERSION:
            raise CheckpointError(f"not a version {CHECKPOINT_VERSION} audit checkpoint")
        if (
            type(value["seq"]) is not int
            or value["seq"] < 1
            or type(value["ts_ms"]) is not int
            or not all(isinstance(value[k], str) for k in ("mac", "segment", "kid", "sig"))
        ):
            raise CheckpointError("a checkpoint field has the wrong type")
        return cls(value["seq"], value["mac"], value["segment"], value["ts_ms"], value["kid"], value["sig"])

    def signature_error(self, keyring: Keyring) -> str:
        """ "" when a configured key signed this checkpoint, else why not."""
        secret = keyring.secret(self.kid)
        if secret is None:
            return f"the checkpoint is signed by an unknown key id {self.kid!r}"
        expected = hmac.new(secret, canonical(self.body()), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.sig):
            return "the checkpoint's signature does not match (edited, or signed with another key)"
        return ""


# Move forward only: a stored checkpoint further on (or the same seq with another mac)
# is left alone and returned. An unreadable stored value is replaced.
_WRITE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, c = pcall(cjson.decode, cur)
  if ok and type(c) == 'table' and tonumber(c['seq']) then
    local seq = tonumber(c['seq'])
    local new = tonumber(ARGV[2])
    if seq > new or (seq == new and c['mac'] ~= ARGV[3]) then
      return cur
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return false
"""


def connect(url: str, *, timeout: float = 2.0) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio client for ``url`` (``redis+cluster://`` for a cluster); connects lazily."""
    parts = urlsplit(url)
    if parts.scheme.endswith("+cluster"):
        plain = urlunsplit((parts.scheme.removesuffix("+cluster"), *parts[1:]))
        return aioredis.RedisCluster.from_url(plain, socket_timeout=timeout, socket_connect_timeout=timeout)
    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


class CheckpointStore:
    """One log's checkpoint in Redis."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, key: str) -> None:
        self._client = client
        self.key = key
        self._script = client.register_script(_WRITE_SCRIPT)

    async def read(self) -> Checkpoint | None:
        """The stored checkpoint (unverified), None when there is none. Raises
        ``CheckpointError`` for a stored value that is not a checkpoint, RedisError."""
        raw = await self._client.get(self.key)
        if raw is None:
            return None
        return Checkpoint.parse(raw)

    async def write(self, checkpoint: Checkpoint) -> None:
        """Store ``checkpoint`` unless the stored one is further on (``CheckpointConflict``)."""
        stored = await self._script(keys=[self.key], args=[checkpoint.to_json(), checkpoint.seq, checkpoint.mac])
        if stored:
            text = stored.decode("utf-8", "replace") if isinstance(stored, bytes) else str(stored)
            raise CheckpointConflict(
                f"the checkpoint in Redis ({self.key}) is ahead of this log: it says {text}, "
                f"the log is at seq {checkpoint.seq}"
            )

    async def archive(self, suffix: str) -> str | None:
        """Move the stored checkpoint aside to ``<key>:superseded:<suffix>``; the new name,
        or None when there was none."""
        target = f"{self.key}:superseded:{suffix}"
        try:
            await self._client.rename(self.key, target)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        return target


def read_checkpoint_sync(url: str, key: str, *, timeout: float = 5.0) -> Checkpoint | None:
    """The stored checkpoint, for the offline verifier (blocking)."""
    parts = urlsplit(url)
    client: redis.Redis | redis.RedisCluster
    if parts.scheme.endswith("+cluster"):
        plain = urlunsplit((parts.scheme.removesuffix("+cluster"), *parts[1:]))
        client = redis.RedisCluster.from_url(plain, socket_timeout=timeout, socket_connect_timeout=timeout)
    else:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        raw = client.get(key)
    finally:
        client.close()
    if raw is None:
        return None
    assert isinstance(raw, bytes | str)
    return Checkpoint.parse(raw)


class HeadSource(Protocol):
    """What the writer needs from the log."""

    def checkpoint(self) -> Checkpoint | None: ...

    def checkpoint_written(self, checkpoint: Checkpoint) -> None: ...

    def checkpoint_refused(self, reason: str) -> None: ...


class CheckpointWriter:
    """Writes the log's head to the store after every batch, off the ack path.

    ``notify()`` after a batch is durable; the writer task stores the newest head
    (several batches may share one write). Redis being away delays checkpoints, never
    acks; the failed write is retried with backoff.
    """

    def __init__(self, store: CheckpointStore, source: HeadSource, *, retry_max_delay: float = 5.0) -> None:
        self._store = store
        self._source = source
        self._retry_max_delay = retry_max_delay
        self._wake = asyncio.Event()
        self._stopping = False
        self._written_seq = 0
        self._refused = False
        self._lock = asyncio.Lock()

    @property
    def written_seq(self) -> int:
        return self._written_seq

    def notify(self) -> None:
        self._wake.set()

    async def write_now(self) -> bool:
        """Store the current head now; True if the store holds it (or nothing to store)."""
        async with self._lock:
            checkpoint = self._source.checkpoint()
            if checkpoint is None or checkpoint.seq <= self._written_seq or self._refused:
                return not self._refused
            try:
                await self._store.write(checkpoint)
            except CheckpointConflict as exc:
                self._refused = True
                metrics.CHECKPOINT_FAILED_REFUSED.inc()
                log.error("checkpoint refused: the log is behind the stored one", extra={"error": str(exc)})
                self._source.checkpoint_refused(str(exc))
                return False
            self._written_seq = checkpoint.seq
            self._source.checkpoint_written(checkpoint)
            metrics.CHECKPOINTS.inc()
            metrics.CHECKPOINT_SEQ.set(checkpoint.seq)
            return True

    async def run(self) -> None:
        """Until ``stop()``: write after every ``notify()``."""
        delay = 0.1
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self.write_now()
                delay = 0.1
            except (RedisError, OSError, TimeoutError) as exc:
                metrics.CHECKPOINT_FAILED_ERROR.inc()
                log.warning("could not write the audit checkpoint; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry_max_delay)
                self._wake.set()

    async def stop(self, *, flush_timeout: float = 2.0) -> None:
        """Write the last head (bounded wait), then end ``run()``."""
        try:
            await asyncio.wait_for(self.write_now(), flush_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.CHECKPOINT_FAILED_ERROR.inc()
            log.warning("the last audit checkpoint was not written", extra={"error": repr(exc)})
        self._stopping = True
        self._wake.set()
