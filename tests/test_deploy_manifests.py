"""The Kustomize manifests as rendered, checked for what would break a real deploy
(issue 12, "Must show"), with nothing but the services' own settings classes as the
reference:

- every HOOSH_* variable a container sets is a setting of that service (the names come
  from each settings class's `model_fields`, env prefix and aliases), and every key of
  the shared `hoosh-env` ConfigMap is a setting of a service that loads it;
- every setting without a default, every address (`*_addr`, `*_url`) and every listen
  address a pod needs in a cluster is provided: not loopback, resolving to a rendered
  Service (or the Valkey / NATS / collector releases), the listen ports matching the
  container's named ports;
- every secretKeyRef names a key of the example Secret (deploy/base/secret.example.yaml)
  and of the Secret the render creates; every $(VAR) refers to a variable defined above
  it in the same container;
- each service reaches Redis and NATS as a user of its own, with its own password, a
  user the Valkey and NATS Helm values (deploy/helm) define with that same Secret key;
- the internal plane: each service that calls another presents a token of its own,
  and each gRPC service accepts exactly the callers that the rendered addresses say
  call it, by the SHA-256 of their tokens (the brief: edge -> router, budget, audit,
  stt; router -> budget, local-inference); no pod holds another service's token, and
  each digest in hoosh-secrets is the SHA-256 of its token;
- and the settings classes accept the environment each container would get (the pod
  would start): the development overlay with its Secret, the production base with the
  example Secret filled with random values.

Each check is a function returning the problems it finds; the mutation tests at the end
break the manifests one way at a time and expect the matching check to complain.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib
import os
import re
import secrets
import tempfile
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hoosh_common.devca import make_ca
from hoosh_common.eventbus_settings import EventBusSettings
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from .test_k8s_render import BASE, RENDERS, render
from .test_observability_deploy import DEPLOY, needs_kubectl

# Each workload's code: its settings live in <package>.config.
PACKAGES = {
    "edge": "hoosh_edge",
    "router": "hoosh_router",
    "budget": "hoosh_budget",
    "local-inference": "hoosh_inference",
    "audit": "hoosh_audit",
    "stt": "hoosh_stt",
}
# The Helm releases deploy/README.md installs beside the manifests (host -> port).
CHART_RELEASES = {"valkey": 6379, "nats": 4222, "otel-collector": 4317}
DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "redis+cluster": 6379, "nats": 4222, "tls": 4222}
DEFAULT_PORTS |= {"http": 80, "https": 443}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
ANY_ADDRESS = {"0.0.0.0", "::", "[::]"}
# Variables the manifests may set that no hoosh settings class reads: read by the
# libraries in the images (vLLM, torch, Hugging Face, whisperx, OpenTelemetry).
EXTERNAL_VARIABLES = {"HOME", "HF_HOME", "PYANNOTE_METRICS_ENABLED"}
EXTERNAL_PREFIXES = ("OTEL_",)
EXAMPLE_SECRETS = BASE / "secret.example.yaml"
PLACEHOLDER = "change-me"
# The internal plane's variables (hoosh_common.internal_plane).
TOKEN = "HOOSH_INTERNAL_TOKEN"
CALLERS = "HOOSH_INTERNAL_CALLERS"
# hoosh-secrets: `internal-token-<service>` is the token the service presents; the
# services it calls read only `internal-token-<service>-sha256`, its hex SHA-256.
TOKEN_KEY = re.compile(r"internal-token-([a-z0-9-]+?)")
DIGEST_SUFFIX = "-sha256"
DIGEST_ENTRY = re.compile(r"sha256:[0-9a-f]{64}")
# The callers the design has for each gRPC service (DESIGN.md, the brief of issue 12);
# the test derives them from the rendered addresses and compares.
DESIGNED_CALLERS = {
    "router": {"edge"},
    "budget": {"edge", "router"},
    "audit": {"edge"},
    "stt": {"edge"},
    "local-inference": {"router"},
}
REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z0-9]+)\)")

Documents = list[dict[str, Any]]


# -- the services' settings ---------------------------------------------------------------------


@cache
def settings_classes(service: str) -> tuple[type[BaseSettings], ...]:
    """Every settings class the service's config module defines (local-inference has two:
    its own, prefix HOOSH_INFERENCE_, and the internal plane's, prefix HOOSH_)."""
    module = importlib.import_module(f"{PACKAGES[service]}.config")
    found = tuple(
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, BaseSettings) and value.__module__ == module.__name__
    )
    assert found, f"{module.__name__} defines no settings class"
    return found


def _names(cls: type[BaseSettings], field: str) -> list[str]:
    """The environment variables a field reads (pydantic-settings: an alias replaces the
    prefixed name; names are case-insensitive)."""
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, str):
        return [alias.upper()]
    if isinstance(alias, AliasChoices):
        return [choice.upper() for choice in alias.choices if isinstance(choice, str)]
    if info.alias:
        return [info.alias.upper()]
    return [(str(cls.model_config.get("env_prefix", "")) + field).upper()]


@cache
def setting_variables(service: str) -> dict[str, tuple[type[BaseSettings], str]]:
    """Environment variable -> (settings class, field) for every setting of the service."""
    found: dict[str, tuple[type[BaseSettings], str]] = {}
    for cls in settings_classes(service):
        for field in cls.model_fields:
            for name in _names(cls, field):
                found[name] = (cls, field)
    return found


def publishes_events(service: str) -> bool:
    return any(issubclass(cls, EventBusSettings) and cls.publishes_events for cls in settings_classes(service))


def _is_path(cls: type[BaseSettings], field: str) -> bool:
    annotation = cls.model_fields[field].annotation
    return annotation is Path or Path in typing.get_args(annotation)


# -- the rendered objects -----------------------------------------------------------------------


def workloads(documents: Documents) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] in ("Deployment", "StatefulSet")}


def containers(documents: Documents) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) for every container of every workload."""
    for name, workload in workloads(documents).items():
        pod = workload["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            yield name, pod, container


def main_container(documents: Documents, name: str) -> dict[str, Any]:
    pod = workloads(documents)[name]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return container


def by_kind(documents: Documents, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def config_map(documents: Documents, name: str) -> dict[str, Any] | None:
    """A rendered ConfigMap by its name in the manifests (a generated one has a hash suffix
    that every reference carries too)."""
    return by_kind(documents, "ConfigMap").get(name)


def hoosh_env(documents: Documents) -> dict[str, str]:
    """The data of the shared ConfigMap hoosh-env (its rendered name has a hash suffix)."""
    (found,) = [
        doc
        for name, doc in by_kind(documents, "ConfigMap").items()
        if name == "hoosh-env" or re.fullmatch(r"hoosh-env-[a-z0-9]{10}", name)
    ]
    return dict(found.get("data") or {})


@cache
def example_secrets() -> dict[str, dict[str, str]]:
    """The Secrets of deploy/base/secret.example.yaml: name -> keys and values."""
    found = {}
    for doc in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()):
        if doc and doc["kind"] == "Secret":
            found[doc["metadata"]["name"]] = {key: str(value) for key, value in doc.get("stringData", {}).items()}
    return found


@cache
def production_secrets() -> dict[str, dict[str, str]]:
    """The example Secrets as an operator fills them: every placeholder a random key (hex,
    32 bytes: long enough for every check, URL-safe for the Redis and NATS URLs), and
    each `<key>-sha256` the hex SHA-256 of `<key>`'s value, as the example's recipe
    computes it."""
    filled = {
        name: {key: re.sub(PLACEHOLDER, lambda _: secrets.token_hex(32), value) for key, value in data.items()}
        for name, data in example_secrets().items()
    }
    for data in filled.values():
        for key in data:
            if key.endswith(DIGEST_SUFFIX) and key.removesuffix(DIGEST_SUFFIX) in data:
                data[key] = _sha256(data[key.removesuffix(DIGEST_SUFFIX)])
    return filled


def rendered_secrets(documents: Documents) -> dict[str, dict[str, str]]:
    found = {}
    for name, doc in by_kind(documents, "Secret").items():
        data = {key: base64.b64decode(value).decode() for key, value in (doc.get("data") or {}).items()}
        found[name] = data | {key: str(value) for key, value in (doc.get("stringData") or {}).items()}
    return found


def secrets_for(documents: Documents) -> dict[str, dict[str, str]]:
    """What the pods of this render would read: the Secrets it creates, else the example's
    (created outside the manifests, as deploy/README.md says)."""
    return production_secrets() | rendered_secrets(documents)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent variables: $(NAME) becomes a variable defined before it, $$ a
    $; a reference to an undefined variable stays as it is."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return REFERENCE.sub(replace, value)


def process_env(documents: Documents, container: dict[str, Any]) -> dict[str, str]:
    """The environment the container's process gets, as the kubelet builds it: envFrom in
    order, then env in order (each value expanded against what is defined before it)."""
    stores = secrets_for(documents)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            found = config_map(documents, source["configMapRef"]["name"])
            env.update((found or {}).get("data", {}))
        elif "secretRef" in source:
            env.update(stores.get(source["secretRef"]["name"], {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = stores.get(ref["name"], {}).get(ref["key"])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = ((config_map(documents, ref["name"]) or {}).get("data") or {}).get(ref["key"])
        else:
            value = "<from the downward API>"
        if value is not None:
            env[item["name"]] = value
    return env


def ingredients(container: dict[str, Any]) -> set[str]:
    """The variables some later value of the container refers to with $(NAME)."""
    found = set()
    for item in container.get("env", []):
        for match in REFERENCE.finditer(str(item.get("value", ""))):
            if match.group(1):
                found.add(match.group(1))
    return found


def _host_port(value: str) -> list[tuple[str, int | None, str | None]]:
    """(host, port, user) of host:port, scheme://[user[:password]@]host[:port][/...], or a
    comma-separated list of them."""
    found: list[tuple[str, int | None, str | None]] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" in part:
            url = urlsplit(part)
            found.append((url.hostname or "", url.port or DEFAULT_PORTS.get(url.scheme), url.username))
        else:
            host, _, port = part.rpartition(":")
            found.append((host, int(port) if port.isdigit() else None, None))
    return found


def service_workloads(documents: Documents, host: str) -> list[str]:
    """The workloads a rendered Service named `host` sends its traffic to."""
    service = by_kind(documents, "Service").get(host.split(".")[0])
    if service is None:
        return []
    selector = service["spec"].get("selector") or {}
    return [
        name
        for name, workload in workloads(documents).items()
        if selector and selector.items() <= workload["spec"]["template"]["metadata"].get("labels", {}).items()
    ]


def _service_ports(documents: Documents, host: str) -> set[int]:
    service = by_kind(documents, "Service").get(host.split(".")[0])
    return {port["port"] for port in service["spec"]["ports"]} if service else set()


# -- the checks ------------------------------------------------------------------------------------


def check_variables_are_settings(documents: Documents) -> list[str]:
    """Every HOOSH_* a container sets is a setting of its service (or an ingredient of a
    later $(VAR)); every other variable is an ingredient or one the images' libraries read."""
    problems = []
    for name, _, container in containers(documents):
        if name not in PACKAGES:
            problems.append(f"{name}: a workload whose settings this test does not know")
            continue
        known = setting_variables(name)
        used = ingredients(container)
        for item in container.get("env", []):
            variable = item["name"]
            if variable in known or variable in used:
                continue
            if not variable.startswith("HOOSH_") and (
                variable in EXTERNAL_VARIABLES or variable.startswith(EXTERNAL_PREFIXES)
            ):
                continue
            problems.append(f"{name}: sets {variable}, which no setting of {name} reads and nothing refers to")
    # The shared ConfigMaps: each HOOSH_* key is read by some service that loads it.
    readers: dict[str, set[str]] = {}
    for name, _, container in containers(documents):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                readers.setdefault(source["configMapRef"]["name"], set()).add(name)
    for config, names in readers.items():
        found = config_map(documents, config)
        for variable in (found or {}).get("data", {}):
            if variable.startswith("HOOSH_") and not any(
                variable in setting_variables(n) for n in names if n in PACKAGES
            ):
                problems.append(f"ConfigMap {config}: {variable} is read by none of {sorted(names)}")
    return problems


def _listen_port_name(field: str) -> str:
    """The container port a listen setting must bind (by the port's name)."""
    if field.endswith("metrics_listen"):
        return "metrics"
    if field.endswith("health_listen"):
        return "grpc-health"  # the plaintext health port for kubelet's probes while TLS is on
    return "grpc"


def check_needed_settings_are_provided(documents: Documents) -> list[str]:
    """Required settings, addresses and listen addresses: provided, and right for a pod."""
    problems = []
    for name in workloads(documents):
        if name not in PACKAGES:
            continue
        container = main_container(documents, name)
        env = process_env(documents, container)
        ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
        fields = {(cls, field) for cls, field in setting_variables(name).values()}
        for cls, field in sorted(fields, key=lambda item: (item[0].__name__, item[1])):
            info = cls.model_fields[field]
            names = _names(cls, field)
            default = info.get_default(call_default_factory=True)
            value = next((env[variable] for variable in names if variable in env), None)
            where = f"{name}: {names[0]}"
            if info.is_required() and value is None:
                problems.append(f"{where} is required and not set")
            if field.endswith(("_addr", "_url")) and default:
                if value is None:
                    problems.append(f"{where} is not set: the default {default!r} is this pod itself")
                    continue
                problems += [f"{where}={value}: {problem}" for problem in _address_problems(documents, value)]
            if field.endswith("listen") and (default or value):
                if value is None:
                    problems.append(f"{where} is not set: the default {default!r} is unreachable from the node")
                    continue
                host, _, port = value.rpartition(":")
                if host not in ANY_ADDRESS:
                    problems.append(f"{where}={value}: binds {host}, not every interface (probes, Service)")
                if not port.isdigit() or ports.get(_listen_port_name(field)) != int(port):
                    problems.append(f"{where}={value}: not the container port '{_listen_port_name(field)}'")
            if field.endswith("_host") and default in LOOPBACK and value not in ANY_ADDRESS:
                problems.append(f"{where}={value}: binds {value or default}, not every interface")
            if field.endswith("_port"):
                port = value if value is not None else str(default)
                if not port.isdigit() or int(port) != ports.get("http"):
                    problems.append(f"{where}={port}: not the container port 'http' ({ports.get('http')})")
    return problems


def _address_problems(documents: Documents, value: str) -> list[str]:
    problems = []
    for host, port, _ in _host_port(value):
        release = host.split(".")[0]
        if host in LOOPBACK:
            problems.append("loopback, in a pod that is this pod itself")
        elif release in CHART_RELEASES:
            if port != CHART_RELEASES[release]:
                problems.append(f"the release {release} listens on {CHART_RELEASES[release]}")
        elif not service_workloads(documents, host):
            problems.append(f"no rendered Service {host} in front of a workload")
        elif port not in _service_ports(documents, host):
            problems.append(f"Service {host} has no port {port}")
    return problems


def check_references(documents: Documents) -> list[str]:
    """secretKeyRef / configMapKeyRef / envFrom name what exists; $(VAR) is defined above."""
    problems = []
    examples = example_secrets()
    created = rendered_secrets(documents)
    for name, _, container in containers(documents):
        defined: set[str] = set()
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                ref = source["configMapRef"]
                found = config_map(documents, ref["name"])
                if found is None and not ref.get("optional"):
                    problems.append(f"{name}: envFrom ConfigMap {ref['name']} is not rendered")
                defined |= set((found or {}).get("data", {}))
            elif "secretRef" in source:
                ref = source["secretRef"]
                if ref["name"] not in examples and ref["name"] not in created:
                    problems.append(f"{name}: envFrom Secret {ref['name']} is neither rendered nor in the example")
        for item in container.get("env", []):
            variable = item["name"]
            for match in REFERENCE.finditer(str(item.get("value", ""))):
                if match.group(1) and match.group(1) not in defined:
                    problems.append(f"{name}: {variable} refers to $({match.group(1)}), not defined above it")
            source = item.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                if ref["key"] not in examples.get(ref["name"], {}):
                    problems.append(f"{name}: {variable} reads {ref['name']}/{ref['key']}, not in the example Secret")
                if ref["name"] in created and ref["key"] not in created[ref["name"]] and not ref.get("optional"):
                    problems.append(f"{name}: {variable} reads {ref['name']}/{ref['key']}, not in the rendered Secret")
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                found = config_map(documents, ref["name"])
                if ref["key"] not in (found or {}).get("data", {}) and not ref.get("optional"):
                    problems.append(f"{name}: {variable} reads ConfigMap {ref['name']}/{ref['key']}, not rendered")
            defined.add(variable)
    return problems


def _secret_source(container: dict[str, Any], variable: str) -> str | None:
    """The Secret key a variable's value takes, through at most one $(VAR)."""
    items = {item["name"]: item for item in container.get("env", [])}
    item = items.get(variable)
    if item is None:
        return None
    ref = item.get("valueFrom", {}).get("secretKeyRef")
    return ref["key"] if ref else None


def check_redis_and_nats_users(documents: Documents) -> list[str]:
    """Each service that reads HOOSH_REDIS_URL / HOOSH_NATS_URL connects as a user named
    after it, with a password of its own from hoosh-secrets (not written in the manifest)."""
    problems = []
    keys: dict[str, str] = {}
    for name in workloads(documents):
        if name not in PACKAGES:
            continue
        container = main_container(documents, name)
        items = {item["name"]: item for item in container.get("env", [])}
        for variable, store in (("HOOSH_REDIS_URL", "redis"), ("HOOSH_NATS_URL", "nats")):
            if variable not in setting_variables(name):
                if variable in items:
                    problems.append(f"{name}: sets {variable}, which it does not read")
                continue
            value = str(items.get(variable, {}).get("value", ""))
            if not value:
                problems.append(f"{name}: {variable} is not set in the container (a user of its own)")
                continue
            url = urlsplit(value)
            if url.username != name:
                problems.append(f"{name}: {variable} connects as {url.username!r}, not as {name!r}")
            match = re.fullmatch(r"\$\(([-._a-zA-Z0-9]+)\)", url.password or "")
            if match is None:
                problems.append(f"{name}: {variable}'s password is not a $(VAR) from a Secret")
                continue
            key = _secret_source(container, match.group(1))
            if key != f"{store}-password-{name}":
                problems.append(f"{name}: {variable}'s password comes from {key!r}, not {store}-password-{name}")
            elif key in keys:
                problems.append(f"{name}: {variable} shares its password with {keys[key]}")
            else:
                keys[key] = name
    return problems


HELM = DEPLOY / "helm"


@cache
def _helm_values(chart: str) -> dict[str, Any]:
    return yaml.safe_load((HELM / f"{chart}-values.yaml").read_text()) or {}


def valkey_users() -> dict[str, str]:
    """The Valkey release's ACL users (deploy/helm/valkey-values.yaml): user -> the key of
    hoosh-secrets holding its password."""
    auth = _helm_values("valkey").get("auth") or {}
    if not auth.get("enabled") or auth.get("usersExistingSecret") != "hoosh-secrets":
        return {}
    return {user: str(spec.get("passwordKey")) for user, spec in (auth.get("aclUsers") or {}).items()}


def nats_users() -> dict[str, str]:
    """The NATS release's users (deploy/helm/nats-values.yaml): user -> the key of
    hoosh-secrets holding its password, through the server's $VARIABLE and the
    container's env (NATS_QUOTED_PASSWORD_X = "$(NATS_PASSWORD_X)", from the Secret)."""
    values = _helm_values("nats")
    env = (values.get("container") or {}).get("env") or {}
    users = ((values.get("config") or {}).get("merge") or {}).get("authorization", {}).get("users") or []
    found = {}
    for user in users:
        match = re.search(r"\$([A-Z0-9_]+)", str(user.get("password", "")))
        variable = match.group(1) if match else None
        for _ in range(3):  # a variable, one that refers to another, ...
            spec = env.get(variable) if variable else None
            ref = spec.get("valueFrom", {}).get("secretKeyRef") if isinstance(spec, dict) else None
            if ref is not None:
                if ref.get("name") == "hoosh-secrets":
                    found[str(user["user"])] = str(ref["key"])
                break
            inner = REFERENCE.search(str(spec)) if spec is not None else None
            variable = inner.group(1) if inner else None
    return found


def chart_secret_keys() -> set[str]:
    """The keys of hoosh-secrets the Valkey and NATS releases read."""
    return set(valkey_users().values()) | set(nats_users().values())


def check_chart_users(documents: Documents) -> list[str]:
    """The user each service connects as exists in its server's chart values, with the
    password from the same Secret key."""
    problems = []
    charts = {"HOOSH_REDIS_URL": ("valkey", valkey_users()), "HOOSH_NATS_URL": ("nats", nats_users())}
    for name in workloads(documents):
        if name not in PACKAGES:
            continue
        container = main_container(documents, name)
        items = {item["name"]: item for item in container.get("env", [])}
        for variable, (chart, users) in charts.items():
            value = str(items.get(variable, {}).get("value", ""))
            if not value:
                continue
            url = urlsplit(value)
            match = re.fullmatch(r"\$\(([-._a-zA-Z0-9]+)\)", url.password or "")
            key = _secret_source(container, match.group(1)) if match else None
            if url.username not in users:
                problems.append(f"{name}: {variable} connects as {url.username!r}, no user of the {chart} values")
            elif users[url.username] != key:
                problems.append(f"{name}: {variable}'s password is {key!r}, the {chart} user's {users[url.username]!r}")
    return problems


def _callers(value: str) -> dict[str, set[str]]:
    """HOOSH_INTERNAL_CALLERS: identity -> its tokens (or sha256:<hex> digests)."""
    found: dict[str, set[str]] = {}
    for entry in value.split(","):
        identity, _, token = entry.strip().partition("=")
        found.setdefault(identity, set()).add(token)
    return found


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _accepts(tokens: set[str], token: str) -> bool:
    return token in tokens or f"sha256:{_sha256(token)}" in tokens


def _token_owner(key: str) -> str | None:
    """The service whose raw token a hoosh-secrets key holds (None: not a token key;
    its `-sha256` digest is not the token)."""
    match = TOKEN_KEY.fullmatch(key)
    if match is None or key.endswith(DIGEST_SUFFIX):
        return None
    return match.group(1)


def _secret_keys_read(pod: dict[str, Any], container: dict[str, Any], stores: dict[str, dict[str, str]]) -> set[str]:
    """The keys of hoosh-secrets a container's process can read: single keys
    (secretKeyRef), a whole Secret (envFrom), and Secret volumes it mounts (their
    `items`, else every key; projected volumes likewise)."""
    keys: set[str] = set()
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["name"] == "hoosh-secrets":
            keys.add(ref["key"])
    for source in container.get("envFrom", []):
        if source.get("secretRef", {}).get("name") == "hoosh-secrets":
            keys |= set(stores.get("hoosh-secrets", {}))
    mounted = {mount["name"] for mount in container.get("volumeMounts", [])}
    for volume in pod.get("volumes", []):
        if volume["name"] not in mounted:
            continue
        projected = volume.get("projected", {}).get("sources", [])
        sources = [{"secret": volume["secret"]}] if "secret" in volume else projected
        for source in sources:
            secret = source.get("secret") or {}
            if (secret.get("secretName") or secret.get("name")) == "hoosh-secrets":
                items = secret.get("items")
                keys |= {item["key"] for item in items} if items else set(stores.get("hoosh-secrets", {}))
    return keys


def check_tokens_stay_with_their_callers(documents: Documents) -> list[str]:
    """No pod holds another service's raw token: none reads `internal-token-<other>`
    from hoosh-secrets (by key, envFrom or a volume), and no container's environment
    carries another service's token value; each `-sha256` key of hoosh-secrets is the
    hex SHA-256 of its token key."""
    problems = []
    stores = secrets_for(documents)
    store = stores.get("hoosh-secrets", {})
    tokens = {owner: value for key, value in store.items() if (owner := _token_owner(key)) and value}
    for name, pod, container in containers(documents):
        for key in sorted(_secret_keys_read(pod, container, stores)):
            owner = _token_owner(key)
            if owner is not None and owner != name:
                problems.append(f"{name}: holds the raw token of {owner} ({key}), with which it could call as {owner}")
        env = process_env(documents, container)
        for owner, token in tokens.items():
            if owner != name and any(token in value for value in env.values()):
                problems.append(f"{name}: its environment carries the raw token of {owner}")
    for key, value in store.items():
        if not key.endswith(DIGEST_SUFFIX) or TOKEN_KEY.fullmatch(key) is None:
            continue
        token_key = key.removesuffix(DIGEST_SUFFIX)
        if token_key not in store:
            problems.append(f"hoosh-secrets: {key} has no {token_key} beside it")
        elif value != _sha256(store[token_key]):
            problems.append(f"hoosh-secrets: {key} is not the SHA-256 of {token_key}")
    return problems


def callees(documents: Documents, name: str) -> set[str]:
    """The hoosh workloads `name` calls over gRPC: its `*_addr` settings' hosts."""
    env = process_env(documents, main_container(documents, name))
    found = set()
    for variable, (_, field) in setting_variables(name).items():
        if field.endswith("_addr") and env.get(variable):
            for host, _, _ in _host_port(env[variable]):
                found |= set(service_workloads(documents, host))
    return found - {name}


def check_internal_plane(documents: Documents) -> list[str]:
    """A caller presents a token of its own; a gRPC service accepts exactly its callers,
    each by the SHA-256 of its token (sha256:<hex>), never by the token itself."""
    problems = []
    names = [name for name in workloads(documents) if name in PACKAGES]
    envs = {name: process_env(documents, main_container(documents, name)) for name in names}
    calls = {name: callees(documents, name) for name in names}
    tokens: dict[str, str] = {}
    for name in names:
        token = envs[name].get(TOKEN)
        if calls[name] and not token:
            problems.append(f"{name} calls {sorted(calls[name])} but presents no {TOKEN}")
        if token and not calls[name]:
            problems.append(f"{name} has a {TOKEN} but calls no hoosh service")
        if token:
            if token in tokens.values():
                problems.append(f"{name} presents the same token as another service")
            tokens[name] = token
    for name in names:
        container = main_container(documents, name)
        serves = any(port.get("name") == "grpc" for port in container.get("ports", []))
        callers = {caller for caller, targets in calls.items() if name in targets}
        value = envs[name].get(CALLERS)
        if not serves:
            if value:
                problems.append(f"{name} serves no gRPC but sets {CALLERS}")
            continue
        if not value:
            problems.append(f"{name} serves gRPC but sets no {CALLERS} (it would answer anyone)")
            continue
        if "$(" in value:
            problems.append(f"{name}: {CALLERS}={value} keeps an unexpanded reference")
        accepted = _callers(value)
        if set(accepted) != callers:
            problems.append(f"{name} accepts {sorted(accepted)}, but {sorted(callers)} call it")
        for caller, entries in sorted(accepted.items()):
            if any(not DIGEST_ENTRY.fullmatch(entry) for entry in entries):
                problems.append(f"{name}: {CALLERS} lists {caller} by a raw token, not sha256:<hex of its SHA-256>")
        for caller in callers & set(accepted):
            if caller in tokens and not _accepts(accepted[caller], tokens[caller]):
                problems.append(f"{name} does not accept the token {caller} presents")
    return problems


TLS_FILES = {"HOOSH_GRPC_TLS_CERT": "tls.crt", "HOOSH_GRPC_TLS_KEY": "tls.key", "HOOSH_GRPC_TLS_CA": "ca.crt"}


@cache
def _development_ca() -> Path:
    return make_ca(Path(tempfile.mkdtemp(prefix="hoosh-deploy-ca-")), services=["service"])


def tls_files_on_certificates(documents: Documents, name: str, env: dict[str, str]) -> list[str]:
    """Each HOOSH_GRPC_TLS_* file lies on a volume of a Secret that a rendered cert-manager
    Certificate fills, under the key cert-manager writes (tls.crt, tls.key, ca.crt) and
    whose certificate names the workload's own Service. The variables are then pointed at
    a development CA's files in ``env``, so the settings classes can read real PEM."""
    problems: list[str] = []
    given = {variable: env[variable] for variable in TLS_FILES if env.get(variable)}
    if not given:
        return problems
    pod = workloads(documents)[name]["spec"]["template"]["spec"]
    mounts = {
        mount["mountPath"].rstrip("/"): mount["name"]
        for mount in main_container(documents, name).get("volumeMounts", [])
    }
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    certificates = {doc["spec"]["secretName"]: doc for doc in documents if doc["kind"] == "Certificate"}
    ca = _development_ca()
    replacement = {"tls.crt": ca / "service.pem", "tls.key": ca / "service-key.pem", "ca.crt": ca / "ca.pem"}
    for variable, path in given.items():
        directory, _, key = path.rpartition("/")
        secret = volumes.get(mounts.get(directory, ""), {}).get("secret", {}).get("secretName")
        certificate = certificates.get(secret or "")
        if certificate is None:
            problems.append(f"{name}: {variable}={path} is not on a volume of a Secret a Certificate fills")
            continue
        if key != TLS_FILES[variable]:
            problems.append(f"{name}: {variable} reads {key}, cert-manager writes {TLS_FILES[variable]}")
        if name not in certificate["spec"].get("dnsNames", []):
            problems.append(
                f"{name}: its certificate {certificate['metadata']['name']} does not name the Service {name}"
            )
        env[variable] = str(replacement[TLS_FILES[variable]])
    if set(given) != set(TLS_FILES):
        problems.append(f"{name}: sets {sorted(given)} of the three HOOSH_GRPC_TLS_* variables")
    return problems


def check_settings_accept_the_environment(documents: Documents, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each settings class, given exactly the environment the container would get,
    validates: the service would start (the internal plane closed in production, the
    event-signing keys there, the listen addresses well formed, ...)."""
    problems = []
    for name in workloads(documents):
        if name not in PACKAGES:
            continue
        env = process_env(documents, main_container(documents, name))
        problems += tls_files_on_certificates(documents, name, env)
        with monkeypatch.context() as patch:
            for variable in list(os.environ):
                if variable.startswith(("HOOSH_", "OTEL_")):
                    patch.delenv(variable)
            for variable, value in env.items():
                patch.setenv(variable, value)
            for cls in settings_classes(name):
                try:
                    cls()
                except ValueError as error:  # pydantic's ValidationError
                    first = str(error).splitlines()[:3]
                    problems.append(f"{name}: {cls.__name__} refuses the pod's environment: {' '.join(first)}")
    return problems


def all_problems(documents: Documents, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return [
        *check_variables_are_settings(documents),
        *check_needed_settings_are_provided(documents),
        *check_references(documents),
        *check_redis_and_nats_users(documents),
        *check_chart_users(documents),
        *check_internal_plane(documents),
        *check_tokens_stay_with_their_callers(documents),
        *check_settings_accept_the_environment(documents, monkeypatch),
    ]


# -- tests ---------------------------------------------------------------------------------------


def test_the_settings_are_found() -> None:
    """The derivation sees what the services read (a renamed module or class fails here)."""
    assert set(PACKAGES) == {path.name for path in (DEPLOY.parent / "services").iterdir() if path.is_dir()}
    for service in PACKAGES:
        variables = setting_variables(service)
        assert variables, service
        assert TOKEN in variables and CALLERS in variables, f"{service}: the internal plane's settings"
    assert {"HOOSH_REDIS_URL", "HOOSH_NATS_URL", "HOOSH_AUDIT_DIR"} <= set(setting_variables("audit"))
    assert "HOOSH_INFERENCE_LISTEN" in setting_variables("local-inference")
    assert {name for name in PACKAGES if publishes_events(name)} == {"router", "budget", "stt"}


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_every_variable_is_a_setting_of_its_service(name: str) -> None:
    problems = check_variables_are_settings(render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_every_needed_setting_is_provided(name: str) -> None:
    problems = check_needed_settings_are_provided(render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_every_reference_resolves(name: str) -> None:
    problems = check_references(render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_each_service_has_its_own_redis_and_nats_user(name: str) -> None:
    problems = check_redis_and_nats_users(render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_each_user_is_one_the_valkey_and_nats_releases_know(name: str) -> None:
    problems = check_chart_users(render(name))
    assert not problems, "\n".join(problems)


def test_the_chart_values_are_read() -> None:
    """The Helm values' users are found (an unexpected shape would make the check vacuous)."""
    services = {"router", "budget", "stt", "audit"}
    assert services | {"edge"} <= set(valkey_users()), valkey_users()
    assert services | {"edge"} <= set(nats_users()), nats_users()


@needs_kubectl
def test_the_reload_broadcast_reaches_every_service_that_reads_the_config() -> None:
    """POST /v1/admin/reload: the edge connects to NATS as `edge` and may send the reload
    request on the subject the code uses for the default prefix; every service whose
    settings read HOOSH_CONFIG (and only those) may hear it and record the outcome."""
    from hoosh_common.events import SUBJECT_CONFIG_RELOAD, SUBJECT_PREFIX
    from hoosh_common.reload import reload_subject

    subject = reload_subject(SUBJECT_PREFIX)
    users = {
        user["user"]: user["permissions"] for user in _helm_values("nats")["config"]["merge"]["authorization"]["users"]
    }
    readers = {name for name in PACKAGES if "HOOSH_CONFIG" in setting_variables(name)}
    assert readers == {"router", "budget"}
    recorded = f"{SUBJECT_PREFIX}.{SUBJECT_CONFIG_RELOAD}"
    for name, permissions in users.items():
        assert (subject in permissions["subscribe"]["allow"]) == (name in readers), name
        assert bool(permissions.get("allow_responses")) == (name in readers), name
        assert (recorded in permissions["publish"]["allow"]) == (name in readers), name
    assert users["edge"]["publish"]["allow"] == [subject]
    base = render("base")
    edge = main_container(base, "edge")
    items = {item["name"]: item for item in edge["env"]}
    assert items["HOOSH_NATS_URL"]["value"] == "nats://edge:$(NATS_PASSWORD)@nats:4222"
    assert items["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "nats-password-edge"
    # Each service reads its answers on the inbox its URL's user gives it
    # (hoosh_common.eventbus.nats_inbox_prefix), the only inbox that user may subscribe to.
    from hoosh_common.eventbus import nats_inbox_prefix

    for name in ("edge", "router", "budget", "audit"):
        env = {item["name"]: item for item in main_container(base, name)["env"]}
        url = env["HOOSH_NATS_URL"]["value"]
        user = url.split("://", 1)[1].split(":", 1)[0]
        assert [s for s in users[user]["subscribe"]["allow"] if s.startswith("_INBOX")] == [
            f"{nats_inbox_prefix(url)}.>"
        ], name


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_the_internal_plane_accepts_exactly_the_callers(name: str) -> None:
    problems = check_internal_plane(render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_no_pod_holds_another_services_token(name: str) -> None:
    problems = check_tokens_stay_with_their_callers(render(name))
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_each_token_is_read_by_its_caller_alone_and_each_digest_is_its_tokens() -> None:
    """The check above is not vacuous: in the renders with every service, each token key
    is read by exactly its own pod, and the digests the callees read are the SHA-256 of
    the tokens (the dev Secret as written; the example as the test fills it)."""
    for name in ("dev+stt+observability", "base+stt+gpu"):
        documents = render(name)
        readers: dict[str, set[str]] = {}
        stores = secrets_for(documents)
        for workload, pod, container in containers(documents):
            for key in _secret_keys_read(pod, container, stores):
                readers.setdefault(key, set()).add(workload)
        assert readers["internal-token-edge"] == {"edge"}, (name, readers)
        assert readers["internal-token-router"] == {"router"}, (name, readers)
        assert readers["internal-token-edge-sha256"] == {"router", "budget", "audit", "stt"}, (name, readers)
        assert readers["internal-token-router-sha256"] == {"budget", "local-inference"}, (name, readers)
        store = stores["hoosh-secrets"]
        for caller in ("edge", "router"):
            assert store[f"internal-token-{caller}-sha256"] == _sha256(store[f"internal-token-{caller}"]), name
    dev = rendered_secrets(render("overlay:dev"))["hoosh-secrets"]
    assert dev["internal-token-edge-sha256"] == _sha256("dev-internal-token-edge")
    # The example holds placeholders for both, with the recipe beside them.
    example = example_secrets()["hoosh-secrets"]
    assert example["internal-token-edge-sha256"] == example["internal-token-router-sha256"] == PLACEHOLDER
    assert "sha256sum" in EXAMPLE_SECRETS.read_text()


@needs_kubectl
def test_a_digest_that_is_not_its_tokens_and_a_token_in_the_wrong_pod_are_caught() -> None:
    documents = copy.deepcopy(render("overlay:dev"))
    (secret,) = [doc for doc in documents if doc["kind"] == "Secret" and doc["metadata"]["name"] == "hoosh-secrets"]
    secret["data"]["internal-token-router-sha256"] = base64.b64encode(_sha256("another token").encode()).decode()
    problems = check_tokens_stay_with_their_callers(documents)
    assert any("internal-token-router-sha256 is not the SHA-256" in problem for problem in problems), problems
    # The whole of hoosh-secrets in a callee's environment, or mounted as a volume, holds
    # every token.
    from_env = _mutated(render("base+stt+gpu"), "audit", _env_from_secret)
    mounted = copy.deepcopy(render("base+stt+gpu"))
    pod = workloads(mounted)["audit"]["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "all-secrets", "secret": {"secretName": "hoosh-secrets"}})
    pod["containers"][0]["volumeMounts"].append({"name": "all-secrets", "mountPath": "/run/all-secrets"})
    for documents in (from_env, mounted):
        problems = check_tokens_stay_with_their_callers(documents)
        assert any("audit: holds the raw token of edge" in problem for problem in problems), problems
        assert any("audit: holds the raw token of router" in problem for problem in problems), problems


@needs_kubectl
def test_the_derived_callers_are_the_designed_ones() -> None:
    documents = render("dev+stt+observability")
    found: dict[str, set[str]] = {}
    for name in workloads(documents):
        for callee in callees(documents, name):
            found.setdefault(callee, set()).add(name)
    assert found == DESIGNED_CALLERS


@needs_kubectl
@pytest.mark.parametrize("name", RENDERS)
def test_the_services_accept_the_environment_they_get(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = check_settings_accept_the_environment(render(name), monkeypatch)
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_the_example_secret_and_the_dev_secret_hold_the_same_keys_and_every_key_is_read() -> None:
    example = example_secrets()
    dev = rendered_secrets(render("overlay:dev"))
    read: dict[tuple[str, str], bool] = {}  # (Secret, key) -> read by a non-optional reference
    for name in RENDERS:
        for _, _, container in containers(render(name)):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    key = (ref["name"], ref["key"])
                    read[key] = read.get(key, False) or not ref.get("optional", False)
    for key in chart_secret_keys():  # the Valkey and NATS releases read theirs
        read[("hoosh-secrets", key)] = True
    unread = {("hoosh-secrets", key) for key in example["hoosh-secrets"]} - set(read)
    assert not unread, f"keys of the example Secret neither a workload nor a chart reads: {sorted(unread)}"
    missing = {key for name, key in read if name == "hoosh-secrets"} - set(example["hoosh-secrets"])
    assert not missing, f"keys read from hoosh-secrets that the example lacks: {sorted(missing)}"
    # The development Secret: a subset of the example, without only what is optional.
    assert set(dev["hoosh-secrets"]) <= set(example["hoosh-secrets"])
    missing = {key for key in example["hoosh-secrets"] if read.get(("hoosh-secrets", key))} - set(dev["hoosh-secrets"])
    assert not missing, f"the dev overlay's Secret lacks required keys: {sorted(missing)}"
    # Passwords and tokens go into URLs and comma-separated lists: no character that breaks them.
    for key, value in dev["hoosh-secrets"].items():
        if key.startswith(("redis-password-", "nats-password-", "internal-token-")):
            assert re.fullmatch(r"[A-Za-z0-9._~-]{16,}", value), key


@needs_kubectl
def test_no_workload_reads_the_old_shared_redis_secret() -> None:
    for name in RENDERS:
        for workload, _, container in containers(render(name)):
            sources = [source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])]
            assert "hoosh-redis" not in sources, (name, workload)
        assert not {"HOOSH_REDIS_URL", "HOOSH_NATS_URL"} & set(hoosh_env(render(name))), name


@needs_kubectl
def test_the_base_tells_the_edge_there_is_no_stt_and_the_component_where_it_is() -> None:
    base = render("base")
    edge = process_env(base, main_container(base, "edge"))
    assert edge["HOOSH_STT_ADDR"] == ""  # transcriptions off, readiness not waiting for stt
    assert "stt" not in workloads(base)
    full = render("dev+stt+observability")
    assert process_env(full, main_container(full, "edge"))["HOOSH_STT_ADDR"] == "stt:50055"


# -- mutations: each check must be able to fail --------------------------------------------------


def _mutated(documents: Documents, workload: str, change: Any) -> Documents:
    copied = copy.deepcopy(documents)
    (target,) = [
        doc for doc in copied if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"] == workload
    ]
    change(target["spec"]["template"]["spec"]["containers"][0])
    return copied


def _drop(variable: str) -> Any:
    def change(container: dict[str, Any]) -> None:
        container["env"] = [item for item in container["env"] if item["name"] != variable]

    return change


def _set(variable: str, value: str) -> Any:
    def change(container: dict[str, Any]) -> None:
        items = [item for item in container["env"] if item["name"] != variable]
        container["env"] = [*items, {"name": variable, "value": value}]

    return change


def _move_to_end(variable: str) -> Any:
    def change(container: dict[str, Any]) -> None:
        (item,) = [item for item in container["env"] if item["name"] == variable]
        container["env"] = [other for other in container["env"] if other is not item] + [item]

    return change


def _secret_key(variable: str, key: str) -> Any:
    def change(container: dict[str, Any]) -> None:
        (item,) = [item for item in container["env"] if item["name"] == variable]
        item["valueFrom"]["secretKeyRef"]["key"] = key

    return change


def _add_secret(variable: str, key: str) -> Any:
    def change(container: dict[str, Any]) -> None:
        ref = {"secretKeyRef": {"name": "hoosh-secrets", "key": key}}
        container["env"] = [{"name": variable, "valueFrom": ref}, *container["env"]]

    return change


def _env_from_secret(container: dict[str, Any]) -> None:
    container["envFrom"] = [*container.get("envFrom", []), {"secretRef": {"name": "hoosh-secrets"}}]


MUTATIONS = {
    # what is broken: (workload, change, the check that must complain, a phrase of its message)
    "a misspelt setting": ("router", _set("HOOSH_ROUTER_LISTN", "0.0.0.0:50051"), "variables", "HOOSH_ROUTER_LISTN"),
    "the listen address left at its loopback default": ("budget", _drop("HOOSH_BUDGET_LISTEN"), "needed", "LISTEN"),
    "a metrics port that is not the container's": (
        "audit",
        _set("HOOSH_AUDIT_METRICS_LISTEN", "0.0.0.0:9999"),
        "needed",
        "metrics",
    ),
    "the Redis URL left at its default": ("stt", _drop("HOOSH_REDIS_URL"), "needed", "HOOSH_REDIS_URL is not set"),
    "a loopback address": ("edge", _set("HOOSH_BUDGET_ADDR", "127.0.0.1:50052"), "needed", "loopback"),
    "an address naming no Service": (
        "router",
        _set("HOOSH_INFERENCE_ADDR", "inference:50053"),
        "needed",
        "no rendered",
    ),
    "the Redis password defined after the URL": (
        "router",
        _move_to_end("REDIS_PASSWORD"),
        "references",
        "REDIS_PASSWORD",
    ),
    "the Redis password removed": ("stt", _drop("REDIS_PASSWORD"), "references", "REDIS_PASSWORD"),
    "a Secret key the example lacks": ("edge", _secret_key("HOOSH_ADMIN_KEY", "admin-key"), "references", "admin-key"),
    "another service's Redis user": (
        "audit",
        _set("HOOSH_REDIS_URL", "redis://router:$(REDIS_PASSWORD)@valkey:6379/0"),
        "users",
        "as 'router'",
    ),
    "another service's NATS password": (
        "budget",
        _secret_key("NATS_PASSWORD", "nats-password-router"),
        "users",
        "nats-password-router",
    ),
    "a user the Valkey values do not know": (
        "audit",
        _set("HOOSH_REDIS_URL", "redis://auditor:$(REDIS_PASSWORD)@valkey:6379/0"),
        "charts",
        "no user of the valkey values",
    ),
    "a caller list without the router": (
        "budget",
        _set(CALLERS, "edge=sha256:$(HOOSH_INTERNAL_CALLER_EDGE_SHA256)"),
        "plane",
        "accepts ['edge']",
    ),
    "a caller that does not call": (
        "audit",
        _set(CALLERS, "edge=sha256:$(HOOSH_INTERNAL_CALLER_EDGE_SHA256),router=sha256:" + "0" * 64),
        "plane",
        "accepts",
    ),
    "the edge's token no longer accepted": (
        "router",
        _secret_key("HOOSH_INTERNAL_CALLER_EDGE_SHA256", "internal-token-router-sha256"),
        "plane",
        "does not accept",
    ),
    "a caller listed by its raw token": (
        "budget",
        _set(CALLERS, "edge=sha256:$(HOOSH_INTERNAL_CALLER_EDGE_SHA256),router=a-raw-router-token-0123456789"),
        "plane",
        "lists router by a raw token",
    ),
    "a callee reading the edge's raw token instead of its digest": (
        "router",
        _secret_key("HOOSH_INTERNAL_CALLER_EDGE_SHA256", "internal-token-edge"),
        "tokens",
        "router: holds the raw token of edge",
    ),
    "a callee given the router's token as well": (
        "local-inference",
        _add_secret("HOOSH_INTERNAL_TOKEN_ROUTER", "internal-token-router"),
        "tokens",
        "local-inference: holds the raw token of router",
    ),
    "the edge without a token": ("edge", _drop(TOKEN), "plane", "presents no"),
    "the callers of local-inference removed": ("local-inference", _drop(CALLERS), "plane", "sets no"),
    "the callers of budget removed": ("budget", _drop(CALLERS), "start", "HOOSH_INTERNAL_CALLERS"),
    "no event-signing key in production": (
        "stt",
        _drop("HOOSH_EVENTS_SIGNING_KEY"),
        "start",
        "HOOSH_EVENTS_SIGNING_KEY",
    ),
}
CHECKS = {
    "variables": check_variables_are_settings,
    "needed": check_needed_settings_are_provided,
    "references": check_references,
    "users": check_redis_and_nats_users,
    "charts": check_chart_users,
    "plane": check_internal_plane,
    "tokens": check_tokens_stay_with_their_callers,
}


@needs_kubectl
def test_the_checks_pass_on_the_renders_the_mutations_start_from(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("base+stt+gpu", "dev+stt+observability"):
        assert not all_problems(render(name), monkeypatch), name


@needs_kubectl
@pytest.mark.parametrize("what", list(MUTATIONS))
def test_each_check_catches_what_it_is_for(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    workload, change, check, phrase = MUTATIONS[what]
    # The production base (example Secret): the pods there must pass every production check.
    documents = _mutated(render("base+stt+gpu"), workload, change)
    if check == "start":
        problems = check_settings_accept_the_environment(documents, monkeypatch)
    else:
        problems = CHECKS[check](documents)
    assert any(phrase in problem for problem in problems), f"{what}: not caught; the check said {problems}"


def test_expand_follows_kubernetes() -> None:
    env = {"A": "x"}
    assert expand("a=$(A),b=$(B),c=$$(A)", env) == "a=x,b=$(B),c=$(A)"
    assert _callers("edge=t1,router=sha256:ab,edge=t2") == {"edge": {"t1", "t2"}, "router": {"sha256:ab"}}
    assert _host_port("redis://router:$(P)@valkey:6379/0") == [("valkey", 6379, "router")]
    assert _host_port("budget:50052") == [("budget", 50052, None)]


@needs_kubectl
def test_the_gpu_component_keeps_the_internal_plane_of_the_base() -> None:
    documents = render("base+stt+gpu")
    env = process_env(documents, main_container(documents, "local-inference"))
    assert env["HOOSH_INFERENCE_ENGINE"] == "vllm"
    assert set(_callers(env[CALLERS])) == {"router"}


@needs_kubectl
def test_a_shared_variable_no_service_reads_is_caught() -> None:
    documents = copy.deepcopy(render("dev+stt+observability"))
    (shared,) = [doc for name, doc in by_kind(documents, "ConfigMap").items() if name.startswith("hoosh-env-")]
    shared["data"]["HOOSH_ROUTR_ADDR"] = "router:50051"
    problems = check_variables_are_settings(documents)
    assert any("HOOSH_ROUTR_ADDR is read by none" in problem for problem in problems), problems


@needs_kubectl
def test_the_tls_files_check_catches_a_path_off_the_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/base/tls.yaml (and components/stt's certificate): each HOOSH_GRPC_TLS_*
    file must come from the workload's own cert-manager Secret, under cert-manager's
    key; a path elsewhere, a wrong key or one variable of the three missing is found."""
    documents = render("dev+stt+gpu+model-download")
    assert not check_settings_accept_the_environment(documents, monkeypatch)
    for change, phrase in (
        (_set("HOOSH_GRPC_TLS_CERT", "/etc/hoosh/hoosh.yaml"), "not on a volume"),
        (_set("HOOSH_GRPC_TLS_KEY", "/etc/hoosh/tls/tls.crt"), "cert-manager writes tls.key"),
        (_drop("HOOSH_GRPC_TLS_CA"), "of the three"),
    ):
        problems = check_settings_accept_the_environment(_mutated(documents, "router", change), monkeypatch)
        assert any(phrase in problem for problem in problems), (phrase, problems)
