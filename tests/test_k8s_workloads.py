"""The workloads as rendered, checked for how they run (issue 12, "Kubernetes that
works"), in every render (tests/test_k8s_render.py):

- every pod and container: non-root (uid, gid, fsGroup), the RuntimeDefault seccomp
  profile, no privilege escalation, all capabilities dropped, a read-only root
  filesystem with an emptyDir on /tmp, and every path a setting names (the config, the
  outbox, the audit log, caches) on a volume, writable where the process writes;
- requests and limits for CPU and memory;
- probes: native gRPC liveness and readiness on the `grpc` port of every gRPC service
  (a readiness service name the protobufs define), HTTP on the edge's own liveness and
  readiness routes;
- a PodDisruptionBudget per workload, selecting it and nothing else; an autoscaling/v2
  CPU HorizontalPodAutoscaler for the edge and the router, on an existing workload that
  leaves its replica count to it;
- the audit a one-replica StatefulSet whose log directory (HOOSH_AUDIT_DIR) is its
  volume claim, and every event publisher's outbox (HOOSH_EVENTS_OUTBOX_DIR) on a claim
  of its own per pod (what eventbus_settings says survives the pod's deletion).

Each check returns its problems; the mutation tests at the end must make each complain.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import PurePosixPath
from typing import Any

import pytest

from .test_deploy_manifests import (
    PACKAGES,
    Documents,
    _is_path,
    by_kind,
    containers,
    main_container,
    process_env,
    publishes_events,
    setting_variables,
    workloads,
)
from .test_k8s_render import RENDERS, render
from .test_observability_deploy import needs_kubectl

AUTOSCALED = {"edge", "router"}
# Settings whose directory the process writes into (the rest of the Path settings are read).
WRITTEN_PATHS = {"events_outbox_dir", "audit_dir", "edge_upload_dir", "stt_align_model_dir"}
# Variables outside the settings that name a directory the images' libraries write into.
WRITTEN_VARIABLES = {"HOME", "HF_HOME"}
# The protobuf modules whose services a readiness probe may name.
PROTO_MODULES = (
    "hoosh.router.v1.router_pb2",
    "hoosh.budget.v1.budget_pb2",
    "hoosh.inference.v1.inference_pb2",
    "hoosh.audit.v1.audit_pb2",
    "hoosh.stt.v1.stt_pb2",
)


def _labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what the manifests use
    match = selector.get("matchLabels") or {}
    return bool(match) and match.items() <= labels.items()


# -- checks -------------------------------------------------------------------------------------


def check_security(documents: Documents) -> list[str]:
    problems = []
    for name, pod, container in containers(documents):
        pod_context = pod.get("securityContext", {})
        context = container.get("securityContext", {})
        where = f"{name}/{container['name']}"
        run_as_non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if run_as_non_root is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        for field in ("runAsUser", "runAsGroup"):
            value = context.get(field, pod_context.get(field))
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{where}: {field} is {value!r}, not a non-root id")
        if not isinstance(pod_context.get("fsGroup"), int) or pod_context["fsGroup"] <= 0:
            problems.append(f"{name}: no fsGroup (volumes would not be writable for the user)")
        profile = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if profile.get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is {profile!r}, not RuntimeDefault")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        capabilities = context.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
            problems.append(f"{where}: capabilities {capabilities!r}, not drop [ALL]")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service-account token it does not use")
    return problems


def check_resources(documents: Documents) -> list[str]:
    problems = []
    for name, _, container in containers(documents):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{name}/{container['name']}: no {resource} {kind[:-1]}")
    return problems


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[dict[str, Any], bool]]:
    """mountPath -> (the volume, or a claim template as {"claim": name}; writable)."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    found = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {"claim": mount["name"]})
        found[mount["mountPath"]] = (volume, not mount.get("readOnly", False))
    return found


def _mount_of(mounts: dict[str, tuple[dict[str, Any], bool]], path: str) -> str | None:
    """The mountPath that holds `path` (the deepest one)."""
    holders = [mount for mount in mounts if PurePosixPath(path).is_relative_to(mount)]
    return max(holders, key=len) if holders else None


def check_filesystem(documents: Documents) -> list[str]:
    """/tmp on an emptyDir; every path a setting names on a volume (writable where written);
    every claim template mounted; no volume mounted that the pod does not define."""
    problems = []
    for name, pod, container in containers(documents):
        where = f"{name}/{container['name']}"
        mounts = _mounts(pod, container)
        tmp = mounts.get("/tmp")
        if tmp is None or "emptyDir" not in tmp[0] or not tmp[1]:
            problems.append(f"{where}: no writable emptyDir on /tmp (the root filesystem is read-only)")
        if name not in PACKAGES or container["name"] != name:
            continue
        workload = workloads(documents)[name]
        claims = {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
        for volume, _ in mounts.values():
            if "claim" in volume and volume["claim"] not in claims:
                problems.append(f"{where}: mounts {volume['claim']}, neither a volume nor a claim template")
        env = process_env(documents, container)
        paths: dict[str, bool] = {}  # variable -> written
        for variable, (cls, field) in setting_variables(name).items():
            if variable in env and env[variable] and _is_path(cls, field):
                paths[variable] = field in WRITTEN_PATHS
        paths |= {variable: True for variable in WRITTEN_VARIABLES if env.get(variable)}
        for variable, written in paths.items():
            value = env[variable]
            mount = _mount_of(mounts, value) if value.startswith("/") else None
            if mount is None:
                problems.append(f"{where}: {variable}={value} is on no volume (the root filesystem is read-only)")
            elif written and not mounts[mount][1]:
                problems.append(f"{where}: {variable}={value} is written, but {mount} is mounted read-only")
    return problems


def _port(container: dict[str, Any], name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


def _proto_services() -> set[str]:
    found = set()
    for module in PROTO_MODULES:
        descriptor = importlib.import_module(module).DESCRIPTOR
        found |= {service.full_name for service in descriptor.services_by_name.values()}
    return found


def _edge_routes() -> dict[str, str]:
    """The edge's health routes: endpoint name -> path (hoosh_edge.routes_operations)."""
    from hoosh_edge.routes_operations import router

    return {route.endpoint.__name__: route.path for route in router.routes if "GET" in getattr(route, "methods", ())}


def check_probes(documents: Documents) -> list[str]:
    problems = []
    services = _proto_services()
    routes = _edge_routes()
    for name, _, container in containers(documents):
        where = f"{name}/{container['name']}"
        # With mutual TLS on, kubelet (plaintext only) probes the health-only port instead
        # (HOOSH_GRPC_HEALTH_LISTEN, a container port named grpc-health).
        grpc_port = _port(container, "grpc-health") or _port(container, "grpc")
        http_port = _port(container, "http")
        probes = {kind: container.get(f"{kind}Probe") for kind in ("liveness", "readiness", "startup")}
        for kind in ("liveness", "readiness"):
            if probes[kind] is None:
                problems.append(f"{where}: no {kind} probe")
        for kind, probe in probes.items():
            if probe is None:
                continue
            if grpc_port is not None:
                grpc = probe.get("grpc")
                if grpc is None or grpc.get("port") != grpc_port:
                    problems.append(f"{where}: {kind} probe {probe!r} is not gRPC on the grpc port {grpc_port}")
                elif grpc.get("service") and grpc["service"] not in services:
                    problems.append(f"{where}: {kind} probe asks for {grpc['service']}, no service of the protos")
                elif kind == "liveness" and grpc.get("service"):
                    # Named services turn NOT_SERVING while the outbox is full: a restart would not help.
                    problems.append(f"{where}: liveness asks for {grpc['service']}, not the process ('')")
            elif http_port is not None:
                expected = {"liveness": routes["health"], "readiness": routes["ready"], "startup": routes["health"]}
                get = probe.get("httpGet", {})
                if get.get("port") not in ("http", http_port) or get.get("path") != expected[kind]:
                    problems.append(f"{where}: {kind} probe {probe!r}, not GET {expected[kind]} on port http")
            else:
                problems.append(f"{where}: neither a grpc nor an http port to probe")
    return problems


def check_disruption_budgets(documents: Documents) -> list[str]:
    problems = []
    budgets = by_kind(documents, "PodDisruptionBudget")
    pods = {name: _labels(workload) for name, workload in workloads(documents).items()}
    for name, budget in budgets.items():
        selected = [workload for workload, labels in pods.items() if _selects(budget["spec"]["selector"], labels)]
        if len(selected) != 1:
            problems.append(f"PodDisruptionBudget {name} selects {selected}, not one workload")
        if ("maxUnavailable" in budget["spec"]) == ("minAvailable" in budget["spec"]):
            problems.append(f"PodDisruptionBudget {name}: set one of maxUnavailable and minAvailable")
        minimum = budget["spec"].get("minAvailable")
        for workload in selected:
            # A floor as high as the replica count (an autoscaled one: its minimum) blocks every drain.
            replicas = workloads(documents)[workload]["spec"].get("replicas", 1)
            if (isinstance(minimum, int) and minimum >= replicas) or minimum == "100%":
                problems.append(f"PodDisruptionBudget {name}: {workload} could never be drained")
    for workload, labels in pods.items():
        covering = [name for name, budget in budgets.items() if _selects(budget["spec"]["selector"], labels)]
        if len(covering) != 1:
            problems.append(f"{workload}: {len(covering)} PodDisruptionBudgets, not one")
    return problems


def check_autoscalers(documents: Documents) -> list[str]:
    problems = []
    autoscalers = by_kind(documents, "HorizontalPodAutoscaler")
    found = {name: workload for name, workload in workloads(documents).items()}
    targets = set()
    for name, autoscaler in autoscalers.items():
        spec = autoscaler["spec"]
        ref = spec["scaleTargetRef"]
        target = found.get(ref["name"])
        if autoscaler["apiVersion"] != "autoscaling/v2":
            problems.append(f"HorizontalPodAutoscaler {name}: {autoscaler['apiVersion']}, not autoscaling/v2")
        if target is None or target["kind"] != ref["kind"] or ref.get("apiVersion") != target["apiVersion"]:
            problems.append(f"HorizontalPodAutoscaler {name} targets {ref}, which is not rendered")
            continue
        targets.add(ref["name"])
        if "replicas" in target["spec"]:
            problems.append(f"{ref['name']}: sets replicas, which every apply would reset under its autoscaler")
        metrics = [m for m in spec.get("metrics", []) if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        if not metrics or metrics[0]["resource"]["target"].get("type") != "Utilization":
            problems.append(f"HorizontalPodAutoscaler {name}: no CPU utilization target")
        if not 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]:
            problems.append(
                f"HorizontalPodAutoscaler {name}: replicas {spec.get('minReplicas')}..{spec['maxReplicas']}"
            )
    for name in AUTOSCALED & set(found):
        if name not in targets:
            problems.append(f"{name}: no HorizontalPodAutoscaler")
    return problems


def check_state(documents: Documents) -> list[str]:
    """The audit log and the outboxes on claims of their own; StatefulSets governed by a
    rendered Service."""
    problems = []
    services = by_kind(documents, "Service")
    for name, workload in workloads(documents).items():
        spec = workload["spec"]
        claims = {claim["metadata"]["name"] for claim in spec.get("volumeClaimTemplates", [])}
        if workload["kind"] == "StatefulSet":
            governing = services.get(spec.get("serviceName", ""))
            if governing is None or not _selects({"matchLabels": governing["spec"]["selector"]}, _labels(workload)):
                problems.append(f"{name}: serviceName {spec.get('serviceName')!r} is no Service in front of it")
            retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
            if claims and retention != {"whenDeleted": "Retain", "whenScaled": "Retain"}:
                problems.append(f"{name}: its claims are deleted with it ({retention})")
        if name not in PACKAGES:
            continue
        container = main_container(documents, name)
        env = process_env(documents, container)
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
        wanted = []
        if name == "audit":
            if workload["kind"] != "StatefulSet" or spec.get("replicas") != 1:
                problems.append(f"audit: a {workload['kind']} of {spec.get('replicas')}, not a StatefulSet of 1")
            wanted.append("HOOSH_AUDIT_DIR")
        if publishes_events(name):
            wanted.append("HOOSH_EVENTS_OUTBOX_DIR")
        for variable in wanted:
            path = env.get(variable)
            holder = _mount_of({mount: ({}, True) for mount in mounts}, path) if path else None
            if holder is None or mounts[holder] not in claims:
                problems.append(f"{name}: {variable}={path} is not on a claim of its own (a volumeClaimTemplate)")
    return problems


CHECKS = {
    "security": check_security,
    "resources": check_resources,
    "filesystem": check_filesystem,
    "probes": check_probes,
    "disruption": check_disruption_budgets,
    "autoscalers": check_autoscalers,
    "state": check_state,
}


# -- tests ---------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", RENDERS)
def test_every_workload_runs_as_designed(name: str, check: str) -> None:
    problems = CHECKS[check](render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_every_workload_is_covered() -> None:
    """The renders hold every workload the checks are about."""
    seen = {workload for name in RENDERS for workload in workloads(render(name))}
    assert seen == set(PACKAGES)


def _edit(documents: Documents, kind: str, name: str, change: Any) -> Documents:
    copied = copy.deepcopy(documents)
    (target,) = [doc for doc in copied if doc["kind"] == kind and doc["metadata"]["name"] == name]
    change(target)
    return copied


def _container(change: Any) -> Any:
    return lambda doc: change(doc["spec"]["template"]["spec"]["containers"][0])


def _pod(change: Any) -> Any:
    return lambda doc: change(doc["spec"]["template"]["spec"])


def _env(variable: str, value: str) -> Any:
    def change(container: dict[str, Any]) -> None:
        (item,) = [item for item in container["env"] if item["name"] == variable]
        item["value"] = value

    return change


MUTATIONS: dict[str, tuple[str, str, Any, str, str]] = {
    # what: (kind, name, change, check, a phrase of the problem)
    "root": (
        "Deployment",
        "edge",
        _pod(lambda pod: pod["securityContext"].update(runAsUser=0)),
        "security",
        "runAsUser",
    ),
    "no fsGroup": (
        "StatefulSet",
        "audit",
        _pod(lambda pod: pod["securityContext"].pop("fsGroup")),
        "security",
        "fsGroup",
    ),
    "writable root": (
        "StatefulSet",
        "router",
        _container(lambda c: c["securityContext"].update(readOnlyRootFilesystem=False)),
        "security",
        "readOnlyRootFilesystem",
    ),
    "a capability kept": (
        "StatefulSet",
        "budget",
        _container(lambda c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"])),
        "security",
        "capabilities",
    ),
    "no memory limit": (
        "Deployment",
        "local-inference",
        _container(lambda c: c["resources"]["limits"].pop("memory")),
        "resources",
        "memory limit",
    ),
    "no /tmp": (
        "StatefulSet",
        "stt",
        _container(lambda c: c.update(volumeMounts=[m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"])),
        "filesystem",
        "/tmp",
    ),
    "the config not mounted": (
        "StatefulSet",
        "budget",
        _container(lambda c: c.update(volumeMounts=[m for m in c["volumeMounts"] if m["name"] != "config"])),
        "filesystem",
        "HOOSH_CONFIG",
    ),
    "the outbox on the root filesystem": (
        "StatefulSet",
        "router",
        _container(_env("HOOSH_EVENTS_OUTBOX_DIR", "/var/lib/outbox")),
        "filesystem",
        "HOOSH_EVENTS_OUTBOX_DIR",
    ),
    "an HTTP liveness probe on a gRPC service": (
        "StatefulSet",
        "audit",
        _container(lambda c: c.update(livenessProbe={"httpGet": {"path": "/", "port": 50054}})),
        "probes",
        "liveness",
    ),
    "a probe on the metrics port": (
        "StatefulSet",
        "budget",
        _container(lambda c: c["readinessProbe"]["grpc"].update(port=9462)),
        "probes",
        "readiness",
    ),
    "a readiness service the protos lack": (
        "StatefulSet",
        "router",
        _container(lambda c: c["readinessProbe"]["grpc"].update(service="hoosh.router.v1.Router")),
        "probes",
        "no service",
    ),
    "the edge's readiness on its liveness route": (
        "Deployment",
        "edge",
        _container(lambda c: c["readinessProbe"]["httpGet"].update(path="/v1/health")),
        "probes",
        "readiness",
    ),
    "a budget selecting nothing": (
        "PodDisruptionBudget",
        "audit",
        lambda doc: doc["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "auditor"}),
        "disruption",
        "selects []",
    ),
    "a budget that blocks every drain": (
        "PodDisruptionBudget",
        "audit",
        lambda doc: doc["spec"].pop("maxUnavailable") and doc["spec"].update(minAvailable=1),
        "disruption",
        "never be drained",
    ),
    "an autoscaler on a Deployment that is a StatefulSet": (
        "HorizontalPodAutoscaler",
        "router",
        lambda doc: doc["spec"]["scaleTargetRef"].update(kind="Deployment"),
        "autoscalers",
        "not rendered",
    ),
    "a replica count under an autoscaler": (
        "Deployment",
        "edge",
        lambda doc: doc["spec"].update(replicas=3),
        "autoscalers",
        "sets replicas",
    ),
    "two audit writers": ("StatefulSet", "audit", lambda doc: doc["spec"].update(replicas=2), "state", "audit"),
    "the audit log beside its claim": (
        "StatefulSet",
        "audit",
        _container(_env("HOOSH_AUDIT_DIR", "/tmp/audit")),
        "state",
        "HOOSH_AUDIT_DIR",
    ),
    "the outbox on an emptyDir": (
        "StatefulSet",
        "budget",
        lambda doc: (
            doc["spec"].pop("volumeClaimTemplates"),
            doc["spec"]["template"]["spec"]["volumes"].append({"name": "outbox", "emptyDir": {}}),
        ),
        "state",
        "HOOSH_EVENTS_OUTBOX_DIR",
    ),
}


@needs_kubectl
@pytest.mark.parametrize("what", list(MUTATIONS))
def test_each_check_catches_what_it_is_for(what: str) -> None:
    kind, name, change, check, phrase = MUTATIONS[what]
    documents = render("dev+stt+observability")
    assert not CHECKS[check](documents)
    problems = CHECKS[check](_edit(documents, kind, name, change))
    assert any(phrase in problem for problem in problems), f"{what}: not caught; the check said {problems}"
