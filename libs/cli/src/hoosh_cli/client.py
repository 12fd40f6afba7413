"""Talking to the edge: where it is, which key to present, and every HTTP failure
mapped to a one-line CliError with its exit status.

The edge: ``--url``, else ``$HOOSH_URL``, else the config file's ``url``, else
http://127.0.0.1:8088.

The API key (models, chat, transcribe; costs, audit, hardware too): ``--api-key``, else
``$HOOSH_API_KEY``, else the config file's ``api_key``. Without one, chat, models and
transcribe send none (``hoosh up`` serves keyless requests on loopback), while costs,
audit and hardware present the admin key when one is found (an operator sees
everything), else none.

The admin key (keys, pools, status, providers, reload): ``--admin-key``, else
``$HOOSH_ADMIN_KEY``, else the file ``$HOOSH_ADMIN_KEY_FILE``, else the config file's
``admin_key``, else ``<state dir>/admin.key`` (``hoosh up`` writes it; the state dir is
``--state-dir``, ``$HOOSH_STATE_DIR`` or ``.hoosh``).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .config import CliConfig, load_config
from .errors import AuthError, CliError, ServerError, UnreachableError, UsageError
from .terminal import clean

DEFAULT_URL = "http://127.0.0.1:8088"
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE = 300  # characters of an error answer that is not the envelope


def option(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    """A common option, wherever on the command line it was given (or ``default``)."""
    value = getattr(args, name, None)
    return default if value is None else value


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line without terminal control, cut at ``limit`` characters."""
    flat = " ".join(clean(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def error_from(response: httpx.Response) -> CliError:
    """The CliError an error answer means: 401/403 AuthError (exit 4), else ServerError
    (exit 1), its message taken from OpenAI's envelope when there is one."""
    status = response.status_code
    code: str | None = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code") or error.get("type")
        message = str(error.get("message") or "")
        if error.get("param"):
            message += f" (param: {error['param']})"
    else:
        message = response.text or response.reason_phrase
    request_id = response.headers.get("x-request-id")
    text = f"HTTP {status}" + (f" {code}" if code else "") + f": {one_line(message)}"
    if request_id:
        text += f" [request {request_id}]"
    if status in (401, 403):
        return AuthError(text)
    return ServerError(text, status=status, code=code)


def transport_error(exc: httpx.HTTPError, url: str) -> CliError:
    """What a failure below HTTP means: no connection (exit 3), or a connection that
    broke or timed out once made (exit 1)."""
    reason = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UnreachableError(f"cannot reach the edge at {url}: {reason}")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return UsageError(f"bad edge URL {url!r}: {reason}")
    if isinstance(exc, httpx.TimeoutException):
        return ServerError(f"the edge at {url} did not answer in time ({type(exc).__name__}; see --timeout)")
    return ServerError(f"the connection to the edge at {url} failed: {reason}")


class Edge:
    """An HTTP client of the edge presenting one key (or none)."""

    def __init__(self, url: str, key: str | None, timeout: float) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, timeout=timeout, headers=headers)

    def __enter__(self) -> Edge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Map httpx's failures inside the block to CliErrors."""
        try:
            yield
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.url) from None

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        accept: tuple[int, ...] = (),
    ) -> Any:
        """The JSON answer of one request. An error status raises (see error_from)
        unless it is in ``accept`` (its body is then the answer too)."""
        with self.errors():
            response = self.http.request(method, path, json=body, params=params)
        return decode(response, accept)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.call("POST", path, **kwargs)


def decode(response: httpx.Response, accept: tuple[int, ...] = ()) -> Any:
    """The JSON body of an answer, or the CliError it means."""
    if response.status_code >= 400 and response.status_code not in accept:
        raise error_from(response)
    try:
        return response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise ServerError(
            f"the edge answered HTTP {response.status_code} with something that is not JSON ({kind})"
        ) from None


def edge_url(text: str) -> str:
    """The edge's URL without a trailing slash, if it is one (else a UsageError; the URL
    is quoted with repr, which escapes control characters)."""
    url = text.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"bad edge URL {url!r}: give http://host:port or https://host:port")
    if clean(url) != url:
        raise UsageError(f"bad edge URL {url!r}: it holds control characters")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise UsageError(f"bad edge URL {url!r}: {one_line(str(exc))}") from None
    if not parsed.host:
        raise UsageError(f"bad edge URL {url!r}: no host (give http://host:port)")
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"bad edge URL {url!r}: port {port} is not 1 to 65535")
    return url


def _read_key_file(path: Path) -> str | None:
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    return key or None


@dataclass(slots=True)
class Context:
    """Everything a command needs from the common options and the config file."""

    url: str
    timeout: float
    json: bool
    state_dir: Path
    config: CliConfig
    api_key_option: str | None = None
    admin_key_option: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, timeout: float = DEFAULT_TIMEOUT) -> Context:
        """The context of a command; ``timeout`` is its default --timeout."""
        config = load_config()
        url = option(args, "url") or os.environ.get("HOOSH_URL") or config.url or DEFAULT_URL
        url = edge_url(str(url))
        timeout = float(option(args, "timeout", timeout))
        if not math.isfinite(timeout) or timeout <= 0:
            raise UsageError("--timeout must be a finite number of seconds above 0")
        return cls(
            url=url,
            timeout=timeout,
            json=bool(option(args, "json", False)),
            state_dir=Path(option(args, "state_dir") or os.environ.get("HOOSH_STATE_DIR") or ".hoosh"),
            config=config,
            api_key_option=option(args, "api_key"),
            admin_key_option=option(args, "admin_key"),
        )

    def api_key(self) -> str | None:
        """--api-key, $HOOSH_API_KEY, the config file's api_key; None when none is set."""
        for key in (self.api_key_option, os.environ.get("HOOSH_API_KEY"), self.config.api_key):
            if key and key.strip():
                return key.strip()
        return None

    def find_admin_key(self) -> str | None:
        """--admin-key, $HOOSH_ADMIN_KEY, $HOOSH_ADMIN_KEY_FILE, the config file's
        admin_key, <state dir>/admin.key; None when none is found."""
        for key in (self.admin_key_option, os.environ.get("HOOSH_ADMIN_KEY")):
            if key and key.strip():
                return key.strip()
        if os.environ.get("HOOSH_ADMIN_KEY_FILE") and (key := _read_key_file(Path(os.environ["HOOSH_ADMIN_KEY_FILE"]))):
            return key
        if self.config.admin_key:
            return self.config.admin_key
        return _read_key_file(self.state_dir / "admin.key")

    def admin_key(self) -> str:
        key = self.find_admin_key()
        if key is None:
            raise AuthError(
                "no admin key: pass --admin-key, set HOOSH_ADMIN_KEY or HOOSH_ADMIN_KEY_FILE, put admin_key in "
                f"{self.config.path}, or run `hoosh up` once (it writes {self.state_dir / 'admin.key'})"
            )
        return key

    def edge(self, *, admin: bool = False, fallback_admin: bool = False) -> Edge:
        """A client presenting the admin key (``admin``), or the API key, falling back
        to the admin key (``fallback_admin``) and then to none."""
        if admin:
            return Edge(self.url, self.admin_key(), self.timeout)
        key = self.api_key()
        if key is None and fallback_admin:
            key = self.find_admin_key()
        return Edge(self.url, key, self.timeout)
