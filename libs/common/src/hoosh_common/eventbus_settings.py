"""The event-bus settings every service that declares the stream or publishes to it
shares, read from the environment (prefix ``HOOSH_``).

A service's settings class inherits them (``class RouterSettings(EventBusSettings)``)
so that router, stt, budget and audit read the same variables: every process that
declares the stream must pass the same ``StreamPolicy`` (or none), and each
publishing process has its own outbox directory under ``HOOSH_EVENTS_OUTBOX_DIR``.

- ``HOOSH_EVENTS_OUTBOX_DIR`` (unset: no outbox, events NATS does not take are
  lost): the parent directory; each service uses ``<dir>/<service>``. It must
  outlive the process: a PersistentVolumeClaim per pod (StatefulSet
  ``volumeClaimTemplates``) keeps it across pod deletion; an ``emptyDir`` only
  across container restarts (a crash, an OOM kill) within one pod.
- ``HOOSH_EVENTS_OUTBOX_MAX_ENTRIES`` (100000), ``HOOSH_EVENTS_OUTBOX_MAX_BYTES``
  (256 MiB): the outbox's bounds. ``HOOSH_EVENTS_OUTBOX_HIGH_WATER`` (0.9): the
  fraction of either bound from which the publisher reports unhealthy.
- ``HOOSH_NATS_STREAM_RETENTION`` (unset: the stream's bounds are not managed):
  ``workqueue`` (recommended, needs the audit consumer to deliver ALL) or ``limits``.
- ``HOOSH_NATS_STREAM_MAX_BYTES`` (1 GiB), ``HOOSH_NATS_STREAM_MAX_MSGS`` (-1: none),
  ``HOOSH_NATS_STREAM_MAX_AGE_SECONDS`` (0: none; ``limits`` only, and required
  there), ``HOOSH_NATS_STREAM_REPLICAS`` (1; 3 on a three-node cluster).
- ``HOOSH_NATS_DUPLICATE_WINDOW_SECONDS`` (120): JetStream's Nats-Msg-Id window.
- ``HOOSH_EVENTS_SIGNING_KEY`` (hex, at least 32 bytes): the key this service signs
  its events with (``hoosh-signature``, see ``hoosh_common.eventbus``), one per
  publishing service; ``HOOSH_EVENTS_SIGNING_KEY_ID`` (default: the service's name,
  ``router``, ``stt``, ``budget``) names it to the audit, which holds every
  publisher's keys (``HOOSH_AUDIT_PUBLISHER_KEYS``). Required with
  ``HOOSH_ENV=production``; in development, unset means unsigned events, which an
  audit configured with publisher keys rejects.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar, Literal

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hoosh_common.eventbus import (
    DEFAULT_STREAM_MAX_BYTES,
    DUPLICATE_WINDOW_S,
    EventPublisher,
    EventSigner,
    StreamPolicy,
    check_key_id,
    ensure_stream,
    placeholder_key,
    signing_key,
)
from hoosh_common.metrics import register_publisher_metrics
from hoosh_common.outbox import DEFAULT_HIGH_WATER, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Outbox

log = logging.getLogger(__name__)


class EventBusSettings(BaseSettings):
    """Stream bounds and the publisher's outbox (see the module docstring)."""

    # hide_input_in_errors: an error of any model validator would print every input,
    # the signing key included (subclasses' configs merge with this one).
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore", hide_input_in_errors=True)

    # False for a service that only consumes (the audit): no signing key is required,
    # and its declaration may update the stream (a publisher's only reads and creates it).
    publishes_events: ClassVar[bool] = True

    env: Literal["production", "development"] = Field(
        default="development", description="production requires HOOSH_EVENTS_SIGNING_KEY"
    )
    events_signing_key: SecretStr | None = Field(
        default=None, description="hex key (>= 32 bytes) this service signs its events with; unset: unsigned (dev)"
    )
    events_signing_key_id: str | None = Field(
        default=None, description="the signing key's id in the audit's HOOSH_AUDIT_PUBLISHER_KEYS (default: service)"
    )
    events_outbox_dir: Path | None = Field(
        default=None, description="Parent of each service's outbox directory; unset: no outbox (events may be lost)"
    )
    events_outbox_max_entries: int = Field(default=DEFAULT_MAX_ENTRIES, ge=1)
    events_outbox_max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    events_outbox_high_water: float = Field(default=DEFAULT_HIGH_WATER, gt=0, le=1)
    nats_stream_retention: Literal["workqueue", "limits"] | None = Field(
        default=None, description="Stream retention with bounds; unset: leave the stream's bounds as they are"
    )
    nats_stream_max_bytes: int = Field(default=DEFAULT_STREAM_MAX_BYTES, ge=1)
    nats_stream_max_msgs: int = Field(default=-1, ge=-1)
    nats_stream_max_age_seconds: float = Field(default=0.0, ge=0)
    nats_stream_replicas: int = Field(default=1, ge=1, le=5)
    nats_duplicate_window_seconds: float = Field(default=DUPLICATE_WINDOW_S, gt=0)

    @field_validator("events_signing_key", "events_signing_key_id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose passes ${VAR:-} through as "": the same as not set.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _policy_is_valid(self) -> EventBusSettings:
        self.stream_policy()  # fail at start, not at the first declaration
        if self.events_signing_key is not None:
            key = signing_key(self.events_signing_key.get_secret_value())
            if self.env == "production" and placeholder_key(key):
                raise ValueError("HOOSH_EVENTS_SIGNING_KEY is a placeholder; use a random key outside development")
        if self.events_signing_key_id is not None:
            check_key_id(self.events_signing_key_id)
        if self.publishes_events and self.env == "production" and self.events_signing_key is None:
            raise ValueError(
                "HOOSH_EVENTS_SIGNING_KEY is required with HOOSH_ENV=production: without it the audit "
                "rejects this service's events (generate one: `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`, and give it to the audit in HOOSH_AUDIT_PUBLISHER_KEYS)"
            )
        return self

    def event_signer(self, service: str) -> EventSigner | None:
        """The signer of this service's events (key id: HOOSH_EVENTS_SIGNING_KEY_ID, else
        the service's name); None without a key (development only)."""
        if self.events_signing_key is None:
            return None
        key = signing_key(self.events_signing_key.get_secret_value())
        return EventSigner(key, self.events_signing_key_id or service)

    def stream_policy(self) -> StreamPolicy | None:
        """The stream's bounds for ``ensure_stream(policy=...)``; None when unmanaged.
        Raises ValueError for a combination that could drop unaudited events."""
        if self.nats_stream_retention is None:
            return None
        return StreamPolicy(
            retention=self.nats_stream_retention,
            max_bytes=self.nats_stream_max_bytes,
            max_msgs=self.nats_stream_max_msgs,
            max_age=self.nats_stream_max_age_seconds,
            replicas=self.nats_stream_replicas,
        )

    async def declare_stream(self, js: JetStreamContext, stream: str, subject_prefix: str) -> StreamInfo:
        """``ensure_stream`` with these settings' duplicate window and bounds (every
        process that declares the stream must pass the same). A publisher (router,
        stt, budget) only reads and creates the stream: when an existing stream's
        settings differ it warns and leaves them for the audit, which updates it
        (``may_update``; the publishers' NATS users have no ``STREAM.UPDATE``)."""
        return await ensure_stream(
            js,
            stream,
            subject_prefix,
            duplicate_window=self.nats_duplicate_window_seconds,
            policy=self.stream_policy(),
            may_update=not self.publishes_events,
        )

    def event_publisher(
        self,
        nc: NATS,
        js: JetStreamContext,
        stream: str,
        subject_prefix: str,
        service: str,
        *,
        max_attempts: int | None = None,
        ack_timeout: float | None = None,
    ) -> EventPublisher:
        """This service's publisher, with its outbox when one is configured (not started).
        By default, with an outbox an unacked event goes to disk after ~3 s (3 tries of
        1 s) rather than waiting ~10 s in memory (5 tries of 2 s)."""
        outbox = self.event_outbox(service)
        signer = self.event_signer(service)
        if signer is None:
            log.warning(
                "events are published unsigned (HOOSH_EVENTS_SIGNING_KEY is not set): "
                "an audit configured with publisher keys records them as rejected",
                extra={"service": service},
            )
        if max_attempts is None:
            max_attempts = 3 if outbox is not None else 5
        if ack_timeout is None:
            ack_timeout = 1.0 if outbox is not None else 2.0
        publisher = EventPublisher(
            nc,
            js,
            stream,
            subject_prefix,
            outbox=outbox,
            max_attempts=max_attempts,
            ack_timeout=ack_timeout,
            duplicate_window=self.nats_duplicate_window_seconds,
            signer=signer,
        )
        register_publisher_metrics(publisher, service)
        return publisher

    def event_outbox(self, service: str) -> Outbox | None:
        """This service's outbox (``<dir>/<service>``, not opened yet), or None."""
        if self.events_outbox_dir is None:
            return None
        return Outbox(
            self.events_outbox_dir / service,
            max_entries=self.events_outbox_max_entries,
            max_bytes=self.events_outbox_max_bytes,
            high_water=self.events_outbox_high_water,
        )
