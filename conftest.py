"""Settings for every test directory. Services started by tests (as processes or in
this one) serve their Prometheus metrics on a free port unless the test names one:
two services on one fixed default port would refuse to start."""

from __future__ import annotations

import os

for _service in ("EDGE", "ROUTER", "BUDGET", "INFERENCE", "AUDIT", "STT"):
    os.environ.setdefault(f"HOOSH_{_service}_METRICS_LISTEN", "127.0.0.1:0")
