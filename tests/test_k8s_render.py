"""Every Kustomize entry point renders, and every object it renders is valid Kubernetes
(issue 12, "Must show"): the base, each component applied on the base, each overlay,
and the overlays with the optional components added, checked offline against the
Kubernetes 1.31+ OpenAPI schemas that `kubernetes-validate` bundles (strict: an unknown
or misspelt field fails).

The renders are also the inputs of tests/test_k8s_workloads.py and
tests/test_deploy_manifests.py (`RENDERS`, `render`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_observability_deploy import DEPLOY, KUBECTL, _render, needs_kubectl

# The Kubernetes versions every rendered object must be valid for: 1.31 (the oldest the
# manifests support: PodDisruptionBudget.unhealthyPodEvictionPolicy is GA there) to the
# newest whose schemas kubernetes-validate bundles (requirements-dev.txt pins it).
# (Each validation takes ~40 ms: the oldest and the newest version, and each distinct
# object once: the renders share most of theirs.)
KUBERNETES_VERSIONS = ("1.31", "1.37")
# Custom resources, not in the Kubernetes schemas: the Prometheus Operator's (checked by
# test_observability_deploy) and cert-manager's.
CUSTOM_KINDS = {
    "monitoring.coreos.com/": {"ServiceMonitor"},
    "cert-manager.io/": {"Certificate", "Issuer", "ClusterIssuer"},
}
CUSTOM_API_GROUPS = tuple(CUSTOM_KINDS)
COMPONENTS = DEPLOY / "components"
OVERLAYS = DEPLOY / "overlays"
BASE = DEPLOY / "base"
# Renders of a whole deployment with optional components added, as an overlay would use them.
COMBINATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dev+stt+observability": ("overlays/dev", ("stt", "observability")),
    "dev+stt+gpu+model-download": ("overlays/dev", ("stt", "gpu", "network-policies/model-download")),
    "base+stt+gpu": ("base", ("stt", "gpu")),
}


def _kind(path: Path) -> str:
    return str(yaml.safe_load((path / "kustomization.yaml").read_text()).get("kind", "Kustomization"))


def kustomizations() -> list[Path]:
    """Every folder of deploy/ with a kustomization.yaml."""
    return sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def components() -> list[str]:
    """Every Component under deploy/components, as a path relative to it."""
    return [
        str(path.relative_to(COMPONENTS))
        for path in kustomizations()
        if path.is_relative_to(COMPONENTS) and _kind(path) == "Component"
    ]


def overlays() -> list[str]:
    return [path.name for path in sorted(OVERLAYS.iterdir()) if (path / "kustomization.yaml").is_file()]


def _compose(resource: str, extra: tuple[str, ...]) -> list[dict[str, Any]]:
    """`resource` (a folder of deploy/) with the components `extra`, rendered through a
    temporary kustomization. On an overlay, the components' objects get its namespace, as
    they would listed in the overlay itself (kustomize rewrites a reference to a generated
    ConfigMap only within one namespace)."""
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
    }
    if resource.startswith("overlays/"):
        kustomization["namespace"] = yaml.safe_load((DEPLOY / resource / "kustomization.yaml").read_text())["namespace"]
    with tempfile.TemporaryDirectory(prefix="hoosh-kustomize-") as folder:
        overlay = Path(folder)
        kustomization["resources"] = [os.path.relpath(DEPLOY / resource, overlay)]
        kustomization["components"] = [os.path.relpath(COMPONENTS / name, overlay) for name in extra]
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return _render(overlay)


def render_names() -> list[str]:
    """Every render the deploy checks run on: the base, the base with each component,
    each overlay, and the combinations."""
    return [
        "base",
        *[f"base+{name}" for name in components()],
        *[f"overlay:{name}" for name in overlays()],
        *COMBINATIONS,
    ]


@cache
def render(name: str) -> list[dict[str, Any]]:
    """The objects of one render (see `render_names`); cached, so treat them as read-only."""
    if name == "base":
        return _render(BASE)
    if name in COMBINATIONS:
        resource, extra = COMBINATIONS[name]
        return _compose(resource, extra)
    if name.startswith("overlay:"):
        return _render(OVERLAYS / name.removeprefix("overlay:"))
    assert name.startswith("base+"), name
    return _compose("base", (name.removeprefix("base+"),))


RENDERS = render_names() if KUBECTL is not None else []


def built_in(documents: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (doc for doc in documents if not doc["apiVersion"].startswith(CUSTOM_API_GROUPS))


# -- tests --------------------------------------------------------------------------------


def test_every_kustomization_is_rendered() -> None:
    """A new component or overlay is picked up without editing this file, and nothing in
    deploy/ escapes: every kustomization is the base, a component or an overlay (or a
    component that one of those includes)."""
    folders = kustomizations()
    assert BASE in folders
    assert {"gpu", "stt", "network-policies", "observability"} <= set(components())
    assert "dev" in overlays()
    covered = {BASE, *(COMPONENTS / name for name in components()), *(OVERLAYS / name for name in overlays())}
    included = {DEPLOY / "observability"}  # a Component of the dashboards, which components/observability includes
    assert set(folders) == covered | included, sorted(map(str, set(folders) - covered - included))


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_it_renders_and_every_object_is_valid_kubernetes(name: str) -> None:
    documents = render(name)
    assert documents, name
    kinds = {doc["kind"] for doc in documents}
    assert {"Service", "ConfigMap"} <= kinds, name
    for document in documents:
        for group, kinds in CUSTOM_KINDS.items():
            if document["apiVersion"].startswith(group):
                assert document["kind"] in kinds, document["kind"]
    problems = []
    for version in KUBERNETES_VERSIONS:
        for document in built_in(documents):
            problem = _validate(json.dumps(document, sort_keys=True), version)
            if problem:
                problems.append(f"{version} {document['kind']}/{document['metadata']['name']}: {problem}")
    assert not problems, "\n".join(problems)


@cache
def _validate(document: str, version: str) -> str | None:
    """The schema's complaint about one object (JSON), None when it is valid; each distinct
    object is validated once per version."""
    import kubernetes_validate  # requirements-dev.txt

    try:
        kubernetes_validate.validate(json.loads(document), version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return str(error.message)
    return None


@needs_kubectl
def test_the_schema_check_catches_a_misspelt_and_a_misplaced_field() -> None:
    """The validation is strict: it would catch what a typo in the manifests makes."""
    import kubernetes_validate

    (workload,) = [doc for doc in render("base") if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "edge"]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    misspelt = {**container, "readinessProbes": container["readinessProbe"]}
    wrong_type = {**container, "ports": [{"name": "http", "containerPort": "8088"}]}
    for broken in (misspelt, wrong_type):
        document = {
            **workload,
            "spec": {**workload["spec"], "template": {"spec": {"containers": [broken]}, "metadata": {}}},
        }
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)
    bundled = {version.rsplit(".", 1)[0] for version in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= bundled, sorted(bundled)
