"""The NetworkPolicies as Kubernetes would enforce them (issue 12, "Must show"): the flows
the services use are derived from their settings and the rendered manifests, and the
rendered policies must allow exactly those and nothing else.

How the expected flows are found, service by service:
- every address its settings class reads (the `*_addr` / `*_url` fields of
  `model_fields`, e.g. HOOSH_BUDGET_ADDR, HOOSH_REDIS_URL), with the value the rendered
  pod gets (container `env` over `envFrom`, else the field's default), resolved like a
  client would: host -> Service (or the Helm release of Valkey, NATS, the collector) ->
  the pods it selects -> the target port;
- the OpenTelemetry exporter's endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), for every service
  that calls `configure_tracing`;
- the router's providers: HTTPS (the default base URLs of every provider type) to the
  internet; local-inference under vLLM with a Hugging Face id: HTTPS to the Hub;
- DNS for every hoosh pod, Prometheus to every `metrics` port, anyone to the edge's HTTP
  port, the NATS servers' cluster routes and the chart's nats-box.

The policies are then evaluated over a model cluster: the rendered hoosh pods, the chart
pods (by the labels their official charts set), kube-dns, Prometheus, public and private
addresses, and impostors derived from every peer selector (a pod that differs from a peer
in one label, or sits in another namespace). Every rule is also removed and widened one
at a time, and each such mutation must be caught.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hoosh_audit.config import AuditSettings
from hoosh_budget.config import BudgetSettings
from hoosh_edge.config import Settings as EdgeSettings
from hoosh_inference.config import InferenceSettings
from hoosh_router.config import NATIVE_BASE_URLS, OPENAI_COMPATIBLE_BASE_URLS, RouterSettings
from hoosh_stt.config import SttSettings
from pydantic_settings import BaseSettings

from .test_observability_deploy import DEPLOY, _render, _workloads, full_render, needs_kubectl

__all__ = ["full_render"]  # the fixture (dev overlay + stt + observability), used below

# Which settings class each workload reads, and the package that holds its code.
SETTINGS: dict[str, type[BaseSettings]] = {
    "edge": EdgeSettings,
    "router": RouterSettings,
    "budget": BudgetSettings,
    "local-inference": InferenceSettings,
    "audit": AuditSettings,
    "stt": SttSettings,
}
PACKAGES = {
    "edge": "hoosh_edge",
    "router": "hoosh_router",
    "budget": "hoosh_budget",
    "local-inference": "hoosh_inference",
    "audit": "hoosh_audit",
    "stt": "hoosh_stt",
}
# The address variables the settings classes read today. A new one fails
# test_every_address_a_service_reads_resolves until it is looked at (and its flow allowed).
ADDRESS_VARIABLES = {
    "HOOSH_ROUTER_ADDR",
    "HOOSH_BUDGET_ADDR",
    "HOOSH_INFERENCE_ADDR",
    "HOOSH_AUDIT_ADDR",
    "HOOSH_STT_ADDR",
    "HOOSH_REDIS_URL",
    "HOOSH_TENANCY_REDIS_URL",  # the edge's key records when not in HOOSH_REDIS_URL's Redis
    "HOOSH_NATS_URL",
}
# Read by hoosh_common.telemetry (the OpenTelemetry exporter) in every service that calls it.
TRACING_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "redis+cluster": 6379, "nats": 4222, "tls": 4222, "http": 80}
DEFAULT_PORTS |= {"https": 443}

# The Helm releases deploy/README.md installs, as their official charts label their pods
# and name their Services (valkey-io/valkey-helm, nats-io/k8s, open-telemetry's chart).
CHART_SERVICES: dict[str, dict[str, Any]] = {
    "valkey": {
        "selector": {"app.kubernetes.io/name": "valkey", "app.kubernetes.io/instance": "valkey"},
        "ports": [{"port": 6379, "targetPort": 6379}],
    },
    "nats": {
        "selector": {
            "app.kubernetes.io/name": "nats",
            "app.kubernetes.io/instance": "nats",
            "app.kubernetes.io/component": "nats",
        },
        "ports": [{"port": 4222, "targetPort": 4222}],
    },
    "otel-collector": {
        "selector": {
            "app.kubernetes.io/name": "opentelemetry-collector",
            "app.kubernetes.io/instance": "otel-collector",
        },
        "ports": [{"port": 4317, "targetPort": 4317}],
    },
}
NATS_CLUSTER_PORT = 6222
PUBLIC_IP = "203.0.113.10"  # stands for a provider's (or the Hub's) address: outside every excepted range
PRIVATE_IPS = {
    "ip-service-range": "10.96.0.10",
    "ip-172": "172.20.1.1",
    "ip-192": "192.168.1.10",
    "ip-cgnat": "100.64.1.1",
    "ip-metadata": "169.254.169.254",
}
TENANT = "tenant"  # another namespace of the cluster
# Probed on every destination besides its own ports (a numeric rule matches whether or
# not the pod listens there).
PROBE_PORTS = {(53, "UDP"), (53, "TCP"), (443, "TCP"), (80, "TCP"), (12345, "TCP")}

Flow = tuple[str, str, int, str]  # source, destination, port, protocol


# -- the model cluster -------------------------------------------------------------------


@dataclass
class Endpoint:
    name: str
    namespace: str | None  # None: an address outside the cluster
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[tuple[str, int, str]] = field(default_factory=list)  # (name, number, protocol)
    ip: str = ""
    hoosh: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def port(self, name: str, protocol: str = "TCP") -> int | None:
        return next(
            (number for port_name, number, proto in self.ports if port_name == name and proto == protocol), None
        )


@dataclass
class World:
    namespace: str
    endpoints: dict[str, Endpoint]
    services: dict[str, dict[str, Any]]  # name -> {"selector", "ports"}
    namespaces: dict[str, dict[str, str]]
    policies: list[dict[str, Any]]
    documents: list[dict[str, Any]]

    @property
    def hoosh(self) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.hoosh]

    def selected(self, selector: dict[str, str], namespace: str) -> list[Endpoint]:
        return [
            ep for ep in self.endpoints.values() if ep.namespace == namespace and selector.items() <= ep.labels.items()
        ]


def _container_ports(container: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [
        (port.get("name", ""), port["containerPort"], port.get("protocol", "TCP"))
        for port in container.get("ports", [])
    ]


def _resolve_env(container: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, str]:
    """What the container's process sees: envFrom in order (later wins), then env."""
    config_maps = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "ConfigMap"}
    secrets = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Secret"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            found = config_maps.get(ref["name"])
            assert found is not None or ref.get("optional"), f"ConfigMap {ref['name']} is not rendered"
            env.update((found or {}).get("data", {}))
        elif "secretRef" in source:
            # Secrets hold keys and passwords, never a different address here (hoosh-redis, when
            # someone creates it, names the same host as hoosh-env with credentials).
            ref = source["secretRef"]
            assert ref["name"] in secrets or ref.get("optional"), f"Secret {ref['name']} is not rendered"
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def _world(documents: list[dict[str, Any]]) -> World:
    workloads = _workloads(documents)
    namespaces = {workload["metadata"]["namespace"] for workload in workloads.values()}
    assert len(namespaces) == 1, namespaces
    namespace = namespaces.pop()
    endpoints: dict[str, Endpoint] = {}

    def add(ep: Endpoint) -> None:
        assert ep.name not in endpoints, ep.name
        if ep.namespace is not None:
            ep.ip = f"10.244.{len(endpoints) // 250}.{len(endpoints) % 250 + 1}"
        endpoints[ep.name] = ep

    hoosh_env: dict[str, str] = {}
    for name, workload in workloads.items():
        template = workload["spec"]["template"]
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == name]
        env = _resolve_env(container, documents)
        labels = template["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == name, f"{name}: pod labels {labels}"
        assert labels.get("app.kubernetes.io/part-of") == "hoosh", f"{name}: pod labels {labels}"
        ports = [port for c in template["spec"]["containers"] for port in _container_ports(c)]
        add(Endpoint(name, namespace, dict(labels), ports, hoosh=True, env=env))
        hoosh_env = {key: value for key, value in env.items() if key in TRACING_VARIABLES} | hoosh_env
    # A hoosh pod that gets no policy of its own (a service added later): only the flows
    # every hoosh pod has, so the namespace-wide default deny is what protects it.
    add(
        Endpoint(
            "newcomer",
            namespace,
            {"app.kubernetes.io/name": "newcomer", "app.kubernetes.io/part-of": "hoosh"},
            [("grpc", 50099, "TCP"), ("metrics", 9499, "TCP")],
            hoosh=True,
            env=hoosh_env,
        )
    )
    chart_pods = [
        ("valkey-0", CHART_SERVICES["valkey"]["selector"], [("tcp", 6379, "TCP")]),
        *[
            (f"nats-{i}", CHART_SERVICES["nats"]["selector"], [("nats", 4222, "TCP"), ("cluster", 6222, "TCP")])
            for i in range(3)
        ],
        (
            "nats-box",
            {**CHART_SERVICES["nats"]["selector"], "app.kubernetes.io/component": "nats-box"},
            [],
        ),
        ("otel-collector", CHART_SERVICES["otel-collector"]["selector"], [("otlp", 4317, "TCP")]),
        ("intruder", {"app": "intruder"}, [("http", 8080, "TCP")]),
    ]
    for name, labels, ports in chart_pods:
        add(Endpoint(name, namespace, dict(labels), list(ports)))
    add(Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")]))
    add(Endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, [("web", 9090, "TCP")]))
    add(Endpoint("outsider", TENANT, {"app": "outsider"}, [("http", 8080, "TCP")]))
    add(Endpoint("internet", None, ip=PUBLIC_IP))
    for name, ip in PRIVATE_IPS.items():
        add(Endpoint(name, None, ip=ip))

    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    # Impostors: for every peer selector, pods that miss it by one label or by namespace.
    count = 0
    for policy in policies:
        policy_ns = policy["metadata"]["namespace"]
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction, []):
                for peer in rule.get(peers_key) or []:
                    if "podSelector" not in peer:
                        continue
                    labels = dict(peer["podSelector"].get("matchLabels", {}))
                    ns_labels = (peer.get("namespaceSelector") or {}).get("matchLabels")
                    # Namespaces are chosen by the name Kubernetes labels them with (none can claim it).
                    assert ns_labels is None or set(ns_labels) == {"kubernetes.io/metadata.name"}, peer
                    home = ns_labels["kubernetes.io/metadata.name"] if ns_labels else policy_ns
                    variants = [(home, {**labels, key: f"impostor-{value}"}) for key, value in labels.items()]
                    variants += [(TENANT, labels), (policy_ns, labels)] if ns_labels else [(TENANT, labels)]
                    for where, impostor in variants:
                        if any(ep.namespace == where and ep.labels == impostor for ep in endpoints.values()):
                            continue
                        count += 1
                        add(Endpoint(f"impostor-{count}", where, impostor, [("metrics", 9400, "TCP")]))

    services: dict[str, dict[str, Any]] = {
        doc["metadata"]["name"]: {"selector": doc["spec"].get("selector", {}), "ports": doc["spec"]["ports"]}
        for doc in documents
        if doc["kind"] == "Service"
    }
    assert not set(services) & set(CHART_SERVICES), "a chart's Service name is taken by a hoosh Service"
    services |= CHART_SERVICES
    all_namespaces = {ep.namespace for ep in endpoints.values() if ep.namespace is not None}
    return World(
        namespace,
        endpoints,
        services,
        {ns: {"kubernetes.io/metadata.name": ns} for ns in all_namespaces},
        policies,
        documents,
    )


# -- NetworkPolicy semantics ------------------------------------------------------------------


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions all hold ({} selects everything)."""
    selector = selector or {}
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(world: World, peer: dict[str, Any], policy_ns: str, ep: Endpoint) -> bool:
    if "ipBlock" in peer:
        # Evaluated against pod addresses too: whether a CNI does so varies, so the rules must
        # be safe either way.
        address = ipaddress.ip_address(ep.ip)
        block = peer["ipBlock"]
        if address.version != ipaddress.ip_network(block["cidr"]).version:
            return False
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(excepted) for excepted in block.get("except", [])
        )
    if ep.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], world.namespaces[ep.namespace]):
            return False
    elif ep.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector"), ep.labels)


def _port_matches(ports: list[dict[str, Any]] | None, target: Endpoint, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        value = entry["port"]
        if isinstance(value, str):
            if target.port(value, protocol) == port:
                return True
        elif value <= port <= entry.get("endPort", value):
            return True
    return False


def _policy_types(spec: dict[str, Any]) -> list[str]:
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


class Enforcer:
    """The rendered (or a mutated) set of policies, applied to the model cluster. Each side
    of a flow is kept apart: the source's egress and the destination's ingress must each
    allow exactly what is needed, so neither relies on the other."""

    def __init__(self, world: World, policies: list[dict[str, Any]]) -> None:
        self.world = world
        self.isolating: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for ep in world.endpoints.values():
            for kind in ("Ingress", "Egress"):
                self.isolating[(ep.name, kind)] = [
                    policy
                    for policy in policies
                    if ep.namespace is not None
                    and policy["metadata"]["namespace"] == ep.namespace
                    and kind in _policy_types(policy["spec"])
                    and _selects(policy["spec"].get("podSelector"), ep.labels)
                ]

    def _side(self, subject: Endpoint, peer: Endpoint, target: Endpoint, port: int, proto: str, kind: str) -> bool:
        if subject.namespace is None:
            return True  # an address outside the cluster is subject to no policy
        isolating = self.isolating[(subject.name, kind)]
        if not isolating:
            return True
        direction, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        for policy in isolating:
            policy_ns = policy["metadata"]["namespace"]
            for rule in policy["spec"].get(direction, []):
                peers = rule.get(peers_key)
                if peers and not any(_peer_matches(self.world, p, policy_ns, peer) for p in peers):
                    continue
                if _port_matches(rule.get("ports"), target, port, proto):
                    return True
        return False

    def egress(self, flow: Flow) -> bool:
        source, destination = self.world.endpoints[flow[0]], self.world.endpoints[flow[1]]
        return self._side(source, destination, destination, flow[2], flow[3], "Egress")

    def ingress(self, flow: Flow) -> bool:
        source, destination = self.world.endpoints[flow[0]], self.world.endpoints[flow[1]]
        return self._side(destination, source, destination, flow[2], flow[3], "Ingress")

    def allows(self, flow: Flow) -> bool:
        return self.egress(flow) and self.ingress(flow)


def _allowed(world: World, policies: list[dict[str, Any]], flow: Flow) -> bool:
    return Enforcer(world, policies).allows(flow)


# -- the flows the services use ------------------------------------------------------------------


def _address_variables(settings: type[BaseSettings]) -> dict[str, str]:
    """Environment variable -> field name, for every address field of a settings class."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    found = {}
    for name, info in settings.model_fields.items():
        if name.endswith(("_addr", "_url")):
            alias = info.validation_alias if isinstance(info.validation_alias, str) else None
            found[(alias or prefix + name).upper()] = name
    return found


def _endpoints_of(value: str) -> list[tuple[str, int]]:
    """host:port, scheme://[user@]host[:port]/..., or a comma-separated list of them."""
    found = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" in part:
            url = urlsplit(part)
            assert url.hostname, part
            found.append((url.hostname, url.port or DEFAULT_PORTS[url.scheme]))
        else:
            host, _, port = part.rpartition(":")
            found.append((host, int(port)))
    return found


def _targets(world: World, host: str, port: int) -> list[tuple[Endpoint, int]]:
    """The pods (and their port) a client reaches at host:port, as a Service routes it."""
    name, *rest = host.split(".")
    assert not rest or rest[0] == world.namespace, f"{host}: another namespace than {world.namespace}"
    service = world.services.get(name)
    assert service is not None, f"{host}: neither a rendered Service nor a chart release ({sorted(CHART_SERVICES)})"
    (service_port,) = [p for p in service["ports"] if p["port"] == port] or [None]
    assert service_port is not None, f"{host}:{port}: the Service has no port {port}"
    target_port = service_port.get("targetPort", port)
    pods = world.selected(service["selector"], world.namespace)
    assert pods, f"{host}: its Service selects no pod"
    resolved = []
    for pod in pods:
        number = pod.port(target_port) if isinstance(target_port, str) else target_port
        assert number is not None, f"{host}:{port}: pod {pod.name} has no port {target_port}"
        resolved.append((pod, number))
    return resolved


def _calls_tracing(workload: str) -> bool:
    spec = importlib.util.find_spec(PACKAGES[workload])
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    return any("configure_tracing(" in path.read_text() for path in package.rglob("*.py"))


def _provider_ports(documents: list[dict[str, Any]]) -> set[int]:
    """The ports the router's providers answer on outside the cluster: every provider type's
    default base URL (the self-hosted types default to loopback, which in a pod needs a
    base_url of its own) and the base_url of every provider the rendered hoosh.yaml names."""
    urls = [url for url in (OPENAI_COMPATIBLE_BASE_URLS | NATIVE_BASE_URLS).values()]
    for doc in documents:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("hoosh-config"):
            for text in doc["data"].values():
                for provider in (yaml.safe_load(text) or {}).get("providers") or []:
                    if provider.get("type") != "local" and provider.get("base_url"):
                        urls.append(provider["base_url"])
    ports = set()
    for url in urls:
        parsed = urlsplit(url)
        assert parsed.hostname, url
        if parsed.hostname in ("localhost", "127.0.0.1", "::1"):
            continue
        ports.add(parsed.port or DEFAULT_PORTS[parsed.scheme])
    return ports


def _setting(env: dict[str, str], settings: type[BaseSettings], name: str) -> str:
    variable = (str(settings.model_config.get("env_prefix", "")) + name).upper()
    default = settings.model_fields[name].default
    return env.get(variable, "" if default is None else str(default))


def _needed(world: World) -> dict[Flow, str]:
    """Every flow the services use, with the reason."""
    flows: dict[Flow, str] = {}
    for pod in world.hoosh:
        settings = SETTINGS.get(pod.name)
        addresses: dict[str, str] = {}
        if settings is not None:
            for variable, name in _address_variables(settings).items():
                addresses[variable] = _setting(pod.env, settings, name)
        if pod.name == "newcomer" or _calls_tracing(pod.name):
            variable = next((v for v in TRACING_VARIABLES if pod.env.get(v)), None)
            if variable:
                addresses[variable] = pod.env[variable]
        for variable, value in addresses.items():
            for host, port in _endpoints_of(value):
                for target, number in _targets(world, host, port):
                    flows[(pod.name, target.name, number, "TCP")] = f"{pod.name} reads {variable}={value}"
        for proto in ("UDP", "TCP"):
            flows[(pod.name, "kube-dns", 53, proto)] = f"{pod.name} resolves Service names"
        metrics = pod.port("metrics")
        assert metrics is not None, f"{pod.name}: no metrics port"
        flows[("prometheus", pod.name, metrics, "TCP")] = "Prometheus scrapes every metrics port"

    # The router's providers: HTTP APIs at the default (or configured) base URLs, all HTTPS.
    for port in _provider_ports(world.documents):
        flows[("router", "internet", port, "TCP")] = "router calls the providers (hoosh.yaml)"
    # local-inference under vLLM with a Hugging Face id downloads the weights at start.
    if "local-inference" in world.endpoints:
        env = world.endpoints["local-inference"].env
        engine = _setting(env, InferenceSettings, "engine")
        model = _setting(env, InferenceSettings, "vllm_model")
        if engine == "vllm" and model and not model.startswith(("/", ".")):
            flows[("local-inference", "internet", 443, "TCP")] = f"vLLM downloads {model} from the Hub"

    edge = world.endpoints["edge"]
    http = edge.port("http")
    assert http is not None
    for source in world.endpoints.values():
        if not source.hoosh:
            flows[(source.name, "edge", http, "TCP")] = "the edge is the front door"
    servers = [pod for pod, _ in _targets(world, "nats", 4222)]
    for a in servers:
        for b in servers:
            if a is not b:
                flows[(a.name, b.name, NATS_CLUSTER_PORT, "TCP")] = "NATS cluster routes"
        flows[("nats-box", a.name, 4222, "TCP")] = "the chart's nats-box (operators' CLI)"
    return flows


def _covered(world: World) -> set[str]:
    """Whose ingress must be exact: the hoosh pods, and the Redis and NATS servers they use."""
    names = {ep.name for ep in world.hoosh}
    for release in ("valkey", "nats"):
        names |= {ep.name for ep in world.selected(CHART_SERVICES[release]["selector"], world.namespace)}
    return names


def _front_door(world: World) -> set[Flow]:
    """What the edge's ingress accepts on purpose: anyone on its HTTP port (a hoosh pod's own
    egress keeps it from calling the edge)."""
    http = world.endpoints["edge"].port("http")
    assert http is not None
    return {(source.name, "edge", http, "TCP") for source in world.endpoints.values() if source.name != "edge"}


def _port_universe(world: World, policies: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """Every port a pod declares or a policy names, and a few more: each is tried on every
    destination (a numeric rule matches whether or not the pod listens there)."""
    ports = set(PROBE_PORTS)
    for ep in world.endpoints.values():
        ports |= {(number, proto) for _, number, proto in ep.ports}
    for policy in policies:
        for direction in ("ingress", "egress"):
            for rule in policy["spec"].get(direction, []):
                for entry in rule.get("ports") or []:
                    if isinstance(entry.get("port"), int):
                        ports.add((entry["port"], entry.get("protocol", "TCP")))
    return ports


def _default_deny(world: World, policies: list[dict[str, Any]]) -> bool:
    """A rule-less policy isolates every hoosh pod both ways: the net under any pod that gets
    no policy of its own, whatever happens to the namespace-wide allow rules."""
    return any(
        not policy["spec"].get("ingress")
        and not policy["spec"].get("egress")
        and set(_policy_types(policy["spec"])) == {"Ingress", "Egress"}
        and policy["metadata"]["namespace"] == world.namespace
        and all(_selects(policy["spec"]["podSelector"], ep.labels) for ep in world.hoosh)
        and policy["spec"]["podSelector"]
        for policy in policies
    )


def _violations(
    world: World,
    policies: list[dict[str, Any]],
    needed: dict[Flow, str],
    *,
    first: bool = False,
    skip: Callable[[Endpoint], bool] = lambda ep: False,
) -> list[str]:
    """What is wrong with `policies`: a needed flow denied, or a flow allowed that is not
    needed, by the sources' egress or by the destinations' ingress (each on its own)."""
    enforcer = Enforcer(world, policies)
    problems: list[str] = []
    if not _default_deny(world, policies):
        problems.append("no default-deny policy (Ingress and Egress, no rules) selects every hoosh pod")
    for flow, why in needed.items():
        if not enforcer.allows(flow):
            problems.append(f"denied but needed: {_show(flow)} ({why})")
    if first and problems:
        return problems
    ports = sorted(_port_universe(world, policies))
    covered = _covered(world)
    front_door = _front_door(world)
    endpoints = list(world.endpoints.values())
    for source in endpoints:
        for destination in endpoints:
            if source is destination or (source.namespace is None and destination.namespace is None):
                continue
            check_egress = source.hoosh and not skip(destination)
            check_ingress = destination.name in covered
            if not (check_egress or check_ingress):
                continue
            for number, proto in ports:
                flow = (source.name, destination.name, number, proto)
                if flow in needed:
                    continue
                if check_egress and enforcer.egress(flow):
                    problems.append(f"egress allows what is not needed: {_show(flow)}")
                elif check_ingress and flow not in front_door and enforcer.ingress(flow):
                    problems.append(f"ingress allows what is not needed: {_show(flow)}")
                else:
                    continue
                if first:
                    return problems
    return problems


def _show(flow: Flow) -> str:
    return f"{flow[0]} -> {flow[1]}:{flow[2]}/{flow[3]}"


def _collector(world: World) -> Callable[[Endpoint], bool]:
    selector = CHART_SERVICES["otel-collector"]["selector"]
    return lambda ep: ep.namespace == world.namespace and selector.items() <= ep.labels.items()


# -- mutations: every rule must matter, and none may be widened ----------------------------------


DELETE = object()


def _mutations(policies: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(what, the policies with it): every policy, rule, port and peer removed in turn, and
    every selector, port list and ipBlock widened in turn."""
    edits: list[tuple[str, int, tuple[Any, ...], Any]] = []  # what, policy, path, new value or DELETE
    for i, policy in enumerate(policies):
        spec = policy["spec"]
        name = policy["metadata"]["name"]
        edits.append((f"{name}: removed", i, (), DELETE))
        if spec["podSelector"]:
            edits.append((f"{name}: selects every pod", i, ("spec", "podSelector"), {}))
        types = _policy_types(spec)
        for kind in types if len(types) > 1 else []:
            edits.append((f"{name}: without {kind}", i, ("spec", "policyTypes"), [t for t in types if t != kind]))
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for j, rule in enumerate(spec.get(direction, [])):
                where, base = f"{name}: {direction}[{j}]", ("spec", direction, j)
                edits.append((f"{where} removed", i, base, DELETE))
                ports = rule.get("ports") or []
                if ports:
                    edits.append((f"{where} on every port", i, (*base, "ports"), DELETE))
                for k in range(len(ports)) if len(ports) > 1 else []:
                    edits.append((f"{where} without port {k}", i, (*base, "ports", k), DELETE))
                peers = rule.get(peers_key) or []
                if peers:
                    edits.append((f"{where} with every peer", i, (*base, peers_key), DELETE))
                for k, peer in enumerate(peers):
                    at, path = f"{where} peer {k}", (*base, peers_key, k)
                    if len(peers) > 1:
                        edits.append((f"{at} removed", i, path, DELETE))
                    for selector in ("podSelector", "namespaceSelector"):
                        if selector in peer and len(peer) > 1:
                            edits.append((f"{at} without {selector}", i, (*path, selector), DELETE))
                        for label in (peer.get(selector) or {}).get("matchLabels", {}):
                            labels = (*path, selector, "matchLabels", label)
                            edits.append((f"{at} without {selector} label {label}", i, labels, DELETE))
                    if peer.get("ipBlock", {}).get("except"):
                        edits.append((f"{at} without except", i, (*path, "ipBlock", "except"), DELETE))
    for what, index, path, value in edits:
        copied = copy.deepcopy(policies)
        if not path:
            del copied[index]
        else:
            parent: Any = copied[index]
            for key in path[:-1]:
                parent = parent[key]
            if value is DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        yield what, copied


# -- rendering ---------------------------------------------------------------------------------


def _render_with(tmp_path: Path, components: list[str]) -> list[dict[str, Any]]:
    """The dev overlay (which has the network-policies component) plus `components`."""
    overlay = tmp_path / "overlay"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "hoosh-check",
                "resources": [os.path.relpath(DEPLOY / "overlays" / "dev", overlay)],
                "components": [os.path.relpath(DEPLOY / "components" / c, overlay) for c in components],
            }
        )
    )
    return _render(overlay)


@pytest.fixture(scope="module")
def world(full_render: list[dict[str, Any]]) -> World:
    return _world(full_render)


# -- tests ----------------------------------------------------------------------------------------


def test_every_address_a_service_reads_is_known() -> None:
    found: dict[str, set[str]] = {}
    for service, settings in SETTINGS.items():
        for variable in _address_variables(settings):
            found.setdefault(variable, set()).add(service)
    assert set(found) == ADDRESS_VARIABLES, (
        f"address variables changed: new {sorted(set(found) - ADDRESS_VARIABLES)}, "
        f"gone {sorted(ADDRESS_VARIABLES - set(found))}: check the flows in network-policies.yaml"
    )
    # stt reserves in Redis in-process: it reads no budget address (so no stt -> budget flow).
    assert "HOOSH_BUDGET_ADDR" not in _address_variables(SttSettings)
    assert "HOOSH_REDIS_URL" in _address_variables(SttSettings)
    assert not _address_variables(InferenceSettings), "local-inference calls nothing"
    for service in SETTINGS:
        assert _calls_tracing(service), f"{service} no longer calls configure_tracing"


@needs_kubectl
def test_the_derived_flows_are_the_designed_ones(world: World) -> None:
    """The derivation itself, summed up per service: the table in network-policies' kustomization."""
    kinds = {
        **{ep.name: ep.name for ep in world.hoosh},
        **{ep.name: "redis" for ep in world.selected(CHART_SERVICES["valkey"]["selector"], world.namespace)},
        **{ep.name: "nats" for ep in world.selected(CHART_SERVICES["nats"]["selector"], world.namespace)},
        "otel-collector": "collector",
        "kube-dns": "dns",
        "internet": "internet",
    }
    table: dict[str, set[str]] = {}
    for source, destination, _, _ in _needed(world):
        if source in SETTINGS:
            table.setdefault(source, set()).add(kinds[destination])
    common = {"dns", "collector"}
    assert table == {
        "edge": common | {"router", "budget", "audit", "stt", "redis", "nats"},  # nats: reloads
        "router": common | {"local-inference", "budget", "redis", "nats", "internet"},
        "budget": common | {"redis", "nats"},
        "audit": common | {"nats", "redis"},
        "stt": common | {"redis", "nats"},
        "local-inference": common,
    }


@needs_kubectl
def test_the_policies_allow_every_flow_the_services_use(world: World) -> None:
    needed = _needed(world)
    denied = [f"{_show(flow)} ({why})" for flow, why in needed.items() if not _allowed(world, world.policies, flow)]
    assert not denied, "\n".join(denied)


@needs_kubectl
def test_the_policies_allow_nothing_else(world: World) -> None:
    problems = _violations(world, world.policies, _needed(world))
    assert not problems, "\n".join(problems[:50])


@needs_kubectl
def test_every_rule_is_needed_and_none_may_be_widened(world: World) -> None:
    needed = _needed(world)
    assert not _violations(world, world.policies, needed, first=True)
    missed = []
    count = 0
    for what, policies in _mutations(world.policies):
        count += 1
        if not _violations(world, policies, needed, first=True):
            missed.append(what)
    assert count > 50, count
    assert not missed, "mutations no check catches:\n" + "\n".join(missed)


@needs_kubectl
def test_stt_reaches_redis_and_nats_but_not_the_budget_service(world: World) -> None:
    def allowed(destination: str, port: int) -> bool:
        return _allowed(world, world.policies, ("stt", destination, port, "TCP"))

    assert allowed("valkey-0", 6379)
    assert allowed("nats-0", 4222)
    assert not allowed("budget", 50052)
    assert _allowed(world, world.policies, ("edge", "stt", 50055, "TCP"))
    assert not _allowed(world, world.policies, ("router", "stt", 50055, "TCP"))


@needs_kubectl
def test_only_the_router_reaches_the_internet_and_never_the_cluster(world: World) -> None:
    for pod in world.hoosh:
        expected = pod.name == "router"
        assert _allowed(world, world.policies, (pod.name, "internet", 443, "TCP")) is expected, pod.name
        assert not _allowed(world, world.policies, (pod.name, "internet", 80, "TCP")), pod.name
        for private in PRIVATE_IPS:
            assert not _allowed(world, world.policies, (pod.name, private, 443, "TCP")), (pod.name, private)


@needs_kubectl
def test_without_observability_the_same_flows_hold(tmp_path: Path) -> None:
    """The dev overlay with stt and no collector: nothing is traced, the rest is unchanged
    (the collector rule stays, unused, so adding the component needs no policy change)."""
    world = _world(_render_with(tmp_path, ["stt"]))
    assert not any(v in ep.env for ep in world.hoosh for v in TRACING_VARIABLES)
    problems = _violations(world, world.policies, _needed(world), skip=_collector(world))
    assert not problems, "\n".join(problems[:50])


@needs_kubectl
def test_the_gpu_component_downloads_the_model_only_with_model_download(tmp_path: Path) -> None:
    plain = _world(_render_with(tmp_path / "plain", ["stt", "gpu"]))
    download = _world(_render_with(tmp_path / "download", ["stt", "gpu", "network-policies/model-download"]))
    flow: Flow = ("local-inference", "internet", 443, "TCP")
    # The gpu component names a Hugging Face id, so the flow is needed in both renders...
    assert flow in _needed(plain) and flow in _needed(download)
    # ...and only the model-download component allows it (and nothing more).
    assert not _allowed(plain, plain.policies, flow)
    problems = _violations(download, download.policies, _needed(download), skip=_collector(download))
    assert not problems, "\n".join(problems[:50])


@needs_kubectl
def test_the_rendered_policies_pass_the_kubernetes_schema(tmp_path: Path, full_render: list[dict[str, Any]]) -> None:
    import kubernetes_validate  # requirements-dev.txt

    documents = full_render + _render_with(tmp_path, ["stt", "gpu", "network-policies/model-download"])
    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    assert len({doc["metadata"]["name"] for doc in policies}) >= 18
    for version in ("1.31", "1.32"):
        for document in documents:
            if document["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/")):
                continue  # a custom resource (Prometheus Operator, cert-manager), not in the schemas
            kubernetes_validate.validate(document, version, strict=True)
