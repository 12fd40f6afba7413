"""The internal plane's settings every hoosh service shares: the token it presents, the
callers it accepts, and mutual TLS (read from the environment, prefix ``HOOSH_``).

- ``HOOSH_INTERNAL_TOKEN`` (or ``HOOSH_INTERNAL_TOKEN_FILE``): the token this process
  presents on every call it makes to another hoosh service (the edge and the router
  call others). One per calling service.
- ``HOOSH_INTERNAL_CALLERS`` (or ``HOOSH_INTERNAL_CALLERS_FILE``): who may call this
  service, ``edge=<token>,router=sha256:<hex>`` (see :mod:`hoosh_common.internal_auth`).
  Unset: the service answers anyone, which ``HOOSH_ENV=production`` refuses.
- ``HOOSH_GRPC_TLS_CERT``, ``HOOSH_GRPC_TLS_KEY``, ``HOOSH_GRPC_TLS_CA`` (PEM files, all
  three or none): mutual TLS on every internal gRPC connection. A server presents its
  certificate and requires a client certificate signed by the CA; a client presents
  its own and checks the server's against the CA and the address's host name. The
  server re-reads its files when they change (cert-manager renews them in place).
- ``HOOSH_INTERNAL_PLAINTEXT`` (unset): ``allow`` lets ``HOOSH_ENV=production`` run
  the plane without mutual TLS, for a cluster whose service mesh (Istio, Linkerd)
  already encrypts and authenticates pod-to-pod traffic. Without it, production
  refuses to start a service that has no certificate: tokens never cross the network
  in the clear by accident.
- ``HOOSH_GRPC_HEALTH_LISTEN`` (unset: none): with TLS on, a second, plaintext port
  that serves only the gRPC health service, for kubelet's native gRPC probes (which
  cannot speak TLS). ``127.0.0.1:0`` in tests, ``0.0.0.0:<port>`` in a pod.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import grpc
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .internal_auth import CallerPolicy, caller_policy, check_token, parse_callers, placeholder_token

log = logging.getLogger(__name__)


class InternalPlaneSettings(BaseSettings):
    """Mixed into each service's settings (``class RouterSettings(EventBusSettings,
    InternalPlaneSettings)``); the class variables say what the service does."""

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore", hide_input_in_errors=True)

    # Does this service serve gRPC (then it must know its callers in production)?
    serves_grpc: ClassVar[bool] = True
    # Does it call other hoosh services over gRPC (then it must present a token)?
    calls_internal: ClassVar[bool] = False

    internal_token: SecretStr | None = Field(
        default=None, description="token this service presents on internal gRPC calls"
    )
    internal_token_file: Path | None = Field(default=None, description="file holding HOOSH_INTERNAL_TOKEN")
    internal_callers: SecretStr | None = Field(
        default=None, description="who may call this service: identity=token or identity=sha256:<hex>, ..."
    )
    internal_callers_file: Path | None = Field(default=None, description="file holding HOOSH_INTERNAL_CALLERS")
    grpc_tls_cert: Path | None = Field(default=None, description="PEM certificate for internal gRPC (mutual TLS)")
    grpc_tls_key: Path | None = Field(default=None, description="PEM private key of HOOSH_GRPC_TLS_CERT")
    grpc_tls_ca: Path | None = Field(default=None, description="PEM CA that signs every internal certificate")
    grpc_health_listen: str = Field(default="", description="plaintext health-only gRPC port while TLS is on")
    internal_plaintext: Literal["", "allow"] = Field(
        default="", description="allow: production without mutual TLS (a service mesh encrypts the pod network)"
    )

    @field_validator(
        "internal_token",
        "internal_token_file",
        "internal_callers",
        "internal_callers_file",
        "grpc_tls_cert",
        "grpc_tls_key",
        "grpc_tls_ca",
        mode="before",
    )
    @classmethod
    def _plane_blank_is_unset(cls, value: object) -> object:
        # Compose passes ${VAR:-} through as "": the same as not set.
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _plane_is_closed_in_production(self) -> InternalPlaneSettings:
        tls = [self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_ca]
        if any(tls) and not all(tls):
            raise ValueError("HOOSH_GRPC_TLS_CERT, HOOSH_GRPC_TLS_KEY and HOOSH_GRPC_TLS_CA go together")
        if self.grpc_tls_cert and self.grpc_tls_key and self.grpc_tls_ca:
            TlsFiles(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_ca).read()  # unreadable: fail at start
        token = self.token()  # reads the files: a missing one fails at start
        callers = self.callers_text()
        if callers:
            parse_callers(callers)  # a malformed list fails at start
        if getattr(self, "env", "development") == "production":
            if not any(tls) and self.internal_plaintext != "allow":
                raise ValueError(
                    "HOOSH_ENV=production needs mutual TLS on the internal plane (HOOSH_GRPC_TLS_CERT, "
                    "HOOSH_GRPC_TLS_KEY, HOOSH_GRPC_TLS_CA; deploy/base/tls.yaml), or "
                    "HOOSH_INTERNAL_PLAINTEXT=allow where a service mesh encrypts the pod network"
                )
            for secret in (token, *_caller_tokens(callers)):
                if secret is not None and placeholder_token(secret):
                    raise ValueError(
                        "an internal token is a placeholder (it says change-me, dev- or repeats one "
                        "character): generate one with python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                    )
            if self.serves_grpc and not callers:
                raise ValueError(
                    "HOOSH_INTERNAL_CALLERS is required with HOOSH_ENV=production: without it this "
                    "service answers any gRPC call on its port"
                )
            if self.calls_internal and token is None:
                raise ValueError(
                    "HOOSH_INTERNAL_TOKEN is required with HOOSH_ENV=production: the services this one "
                    "calls refuse calls without it"
                )
        return self

    def token(self) -> str | None:
        if self.internal_token is not None:
            return check_token(self.internal_token.get_secret_value())
        if self.internal_token_file is not None:
            return check_token(_read_secret(self.internal_token_file, "HOOSH_INTERNAL_TOKEN_FILE"))
        return None

    def callers_text(self) -> str | None:
        if self.internal_callers is not None:
            return self.internal_callers.get_secret_value()
        if self.internal_callers_file is not None:
            return _read_secret(self.internal_callers_file, "HOOSH_INTERNAL_CALLERS_FILE")
        return None

    def internal_plane(
        self,
        service: str,
        *,
        callers: Iterable[str] = (),
        limits: Mapping[str, Iterable[str]] | None = None,
    ) -> InternalPlane:
        """This process's plane: its token, its server's caller policy (``callers``: the
        identities hoosh's design has call this service; ``limits``: the only methods
        some of them may call) and its TLS material."""
        policy = caller_policy(self.callers_text(), expected=tuple(callers), limits=limits, service=service)
        if self.serves_grpc and policy is None:
            log.warning(
                "HOOSH_INTERNAL_CALLERS is not set: this service answers any gRPC call (development only)",
                extra={"service": service},
            )
        tls = None
        if self.grpc_tls_cert and self.grpc_tls_key and self.grpc_tls_ca:
            tls = TlsFiles(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_ca)
        return InternalPlane(
            service=service, token=self.token(), policy=policy, tls=tls, health_listen=self.grpc_health_listen
        )


def _caller_tokens(callers: str | None) -> list[str]:
    """The raw tokens in a callers list (``sha256:`` entries carry none)."""
    tokens = []
    for entry in (callers or "").split(","):
        _, _, secret = entry.strip().partition("=")
        if secret and not secret.startswith("sha256:"):
            tokens.append(secret)
    return tokens


def _read_secret(path: Path, name: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            cert, key, ca = self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as error:
            raise ValueError(f"internal TLS: cannot read {error.filename}: {error.strerror}") from None
        for name, pem in (("HOOSH_GRPC_TLS_CERT", cert), ("HOOSH_GRPC_TLS_KEY", key), ("HOOSH_GRPC_TLS_CA", ca)):
            if b"-----BEGIN " not in pem:
                raise ValueError(f"internal TLS: {name} is not a PEM file")
        return cert, key, ca

    def stamp(self) -> tuple[int, ...]:
        """Changes when any of the files does (cert-manager swaps them in place)."""
        stamps: list[int] = []
        for path in (self.cert, self.key, self.ca):
            try:
                status = os.stat(path)
            except OSError:
                stamps.extend((0, 0))
                continue
            stamps.extend((status.st_mtime_ns, status.st_ino))
        return tuple(stamps)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Require a client certificate signed by the CA; re-read the files when they change."""
        loaded = [self.stamp()]

        def configuration() -> grpc.ServerCertificateConfiguration:
            cert, key, ca = self.read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC on each new connection's handshake: cheap when nothing changed.
            stamp = self.stamp()
            if stamp == loaded[0]:
                return None
            loaded[0] = stamp  # tried once per change of the files, not once per handshake
            try:
                fresh = configuration()
            except ValueError as error:
                log.error("internal TLS: the new certificate files are unreadable; keeping the old ones: %s", error)
                return None
            log.info("internal TLS: certificate files reloaded")
            return fresh

        # gRPC documents None from the fetcher as "no change"; types-grpcio omits it.
        return grpc.dynamic_ssl_server_credentials(
            configuration(),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


@dataclass(frozen=True)
class InternalPlane:
    """What :func:`hoosh_common.grpc_server.configure_plane` applies to the process."""

    service: str
    token: str | None = None
    policy: CallerPolicy | None = None
    tls: TlsFiles | None = None
    health_listen: str = ""
