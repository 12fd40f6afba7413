"""``python -m hoosh_edge``: serve the edge with uvicorn (uvloop, httptools, no access log)."""

# ruff: noqa: E402  (the imports below come after skip_aiohttp_for_nats)

from __future__ import annotations

from hoosh_common.lean_imports import skip_aiohttp_for_nats

skip_aiohttp_for_nats()  # before anything imports nats: see hoosh_common.lean_imports

import atexit
import logging
import os
import shutil
import sys
import tempfile

import uvicorn
from hoosh_common.logs import configure_logging
from pydantic import ValidationError

from .config import Settings
from .metrics import MULTIPROC_ENV, serve_edge_metrics
from .server import uvicorn_options

log = logging.getLogger("hoosh_edge")


def main() -> None:
    """Read settings (fail fast), then run uvicorn; each worker builds its app via ``serve_app``."""
    configure_logging("edge")
    try:
        settings = Settings()
    except ValidationError as exc:
        # Without the inputs: they may hold the admin key.
        log.error("invalid edge settings", extra={"errors": exc.errors(include_url=False, include_input=False)})
        sys.exit(2)
    if os.environ.get("HOOSH_API_KEYS"):
        log.warning(
            "HOOSH_API_KEYS is no longer read: create keys with `hoosh keys create` (POST /v1/admin/keys); "
            "the bootstrap admin key is HOOSH_ADMIN_KEY or HOOSH_ADMIN_KEY_FILE"
        )
    log.info(
        "edge starting",
        extra={
            "host": settings.edge_host,
            "port": settings.edge_port,
            "workers": settings.edge_workers,
            "max_connections": settings.edge_max_connections,
            "router": settings.router_addr,
            "budget": settings.budget_addr,
            "audit": settings.audit_addr,
            "auth": settings.auth,
            "env": settings.env,
            "admin_key": "set" if settings.admin_keys else "none",
            "tenancy_key_prefix": settings.tenancy_key_prefix,
        },
    )
    if settings.edge_workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Workers write their metrics to files this process (the supervisor) aggregates;
        # set before any worker starts (each imports prometheus_client afresh).
        os.environ[MULTIPROC_ENV] = directory = tempfile.mkdtemp(prefix="hoosh-edge-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    serve_edge_metrics(settings.edge_metrics_listen)
    # A factory by import path: with several workers each process builds its own app,
    # channels and tracing (grpc.aio channels belong to one event loop).
    uvicorn.run(
        "hoosh_edge.app:serve_app",
        factory=True,
        host=settings.edge_host,
        port=settings.edge_port,
        workers=settings.edge_workers,
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_config=None,  # keep hoosh's JSON logging
        timeout_graceful_shutdown=10,
        # httptools with read deadlines, header and connection bounds; the keep-alive timeout
        **uvicorn_options(settings),
    )


if __name__ == "__main__":
    main()
