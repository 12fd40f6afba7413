"""The Kustomize manifests as rendered, checked for what would break a real deploy
(issue 12 grows this file): every service that talks to Redis can read the Redis
credentials Secret, and the edge is told whether speech-to-text exists."""

from __future__ import annotations

from typing import Any

from .test_observability_deploy import DEPLOY, _render, _workloads, full_render, needs_kubectl

# The services whose settings read HOOSH_REDIS_URL (key store, budgets, health, checkpoints).
USES_REDIS = {"edge", "router", "budget", "audit", "stt"}

__all__ = ["full_render"]  # the fixture, used below


def _env_sources(workload: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    secrets = {source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source}
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}, secrets


def _hoosh_env(documents: list[dict[str, Any]]) -> dict[str, str]:
    [config] = [
        doc for doc in documents if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("hoosh-env")
    ]
    return dict(config["data"])


@needs_kubectl
def test_every_redis_user_can_read_the_redis_credentials(full_render: list[dict[str, Any]]) -> None:
    workloads = _workloads(full_render)
    assert USES_REDIS <= set(workloads)
    missing = [name for name in sorted(USES_REDIS) if "hoosh-redis" not in _env_sources(workloads[name])[1]]
    assert not missing, f"no hoosh-redis secretRef (HOOSH_REDIS_URL with the password): {missing}"


@needs_kubectl
def test_the_base_tells_the_edge_there_is_no_stt_and_the_component_where_it_is(
    full_render: list[dict[str, Any]],
) -> None:
    base = _render(DEPLOY / "base")
    assert _hoosh_env(base)["HOOSH_STT_ADDR"] == ""  # transcriptions off, readiness not waiting for stt
    assert "stt" not in _workloads(base)
    assert _hoosh_env(full_render)["HOOSH_STT_ADDR"] == "stt:50055"
