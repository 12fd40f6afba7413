"""docker-compose.yml, read the way `docker compose` reads it (no Docker engine here).

The file is interpolated from .env.example (`cp .env.example .env` is the documented
first step) with compose's own rules, then checked: it validates against the Compose
Specification's published JSON schema (the copy the check-jsonschema package vendors
from compose-spec/compose-spec); every service has a healthcheck and waits for what it
needs to be healthy; every image is pinned; no password, key or token can be empty; each
callee accepts exactly its callers, by the SHA-256 of the tokens they present, and no
container holds another service's token or TLS key (the certs job, run here, gives each
service a directory of its own, the only part of the volume it mounts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"


# --------------------------------------------------------------------------- interpolation
class InterpolationError(ValueError):
    """A `${VAR:?message}` (or `${VAR?message}`) whose variable is missing."""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution (compose-spec, "Interpolation"): `$$` is a literal
    `$`; `$VAR` and `${VAR}`; `${VAR:-default}` / `${VAR-default}` when unset or empty /
    unset; `${VAR:?err}` / `${VAR?err}` fail when unset or empty / unset;
    `${VAR:+alt}` / `${VAR+alt}` give `alt` when set and not empty / set. Defaults,
    alternatives and messages are themselves interpolated (nesting)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2 : end], env))
            i = end + 1
        else:
            m = _NAME.match(text, i + 1)
            if m is None:
                out.append("$")
                i += 1
            else:
                out.append(env.get(m.group(), ""))
                i = m.end()
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unclosed ${{ in {text!r}")


def _expand(expr: str, env: Mapping[str, str]) -> str:
    m = _NAME.match(expr)
    if m is None:
        raise InterpolationError(f"invalid interpolation format ${{{expr}}}")
    name, rest = m.group(), expr[m.end() :]
    value = env.get(name)
    if rest == "":
        return value or ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            break
    else:
        raise InterpolationError(f"invalid interpolation format ${{{expr}}}")
    present = value is not None and (value != "" or ":" not in op)
    if op in (":-", "-"):
        return value if present and value is not None else interpolate(arg, env)
    if op in (":?", "?"):
        if not present:
            raise InterpolationError(f"required variable {name} is missing a value: {interpolate(arg, env)}")
        return value or ""
    return interpolate(arg, env) if present else ""


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of the parsed file (keys stay as they are, as in compose)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return node


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose's .env reader takes them (comments, blank lines and
    surrounding quotes aside)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        env[key.strip()] = value
    return env


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("plain", {}, "plain"),
        ("$$HOME and $$$$", {"HOME": "x"}, "$HOME and $$"),
        ("${A}/$A/${B}", {"A": "a"}, "a/a/"),
        ("${A:-d}|${A-d}", {"A": ""}, "d|"),
        ("${A:-d}|${A-d}", {}, "d|d"),
        ("${A:-${B:-inner}}", {}, "inner"),
        ("${A:+alt}|${A+alt}", {"A": ""}, "|alt"),
        ("${A:+alt}", {"A": "v"}, "alt"),
        ("${A:?message}", {"A": "set"}, "set"),
        ("${A?message}", {"A": ""}, ""),
        ("redis://:${P:?need P}@redis:6379/0", {"P": "pw"}, "redis://:pw@redis:6379/0"),
        ("$ alone and $1", {}, "$ alone and $1"),
    ],
)
def test_interpolation_follows_compose(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(
    ("text", "env"), [("${A:?need A}", {}), ("${A:?need A}", {"A": ""}), ("${A?x}", {}), ("${A", {})]
)
def test_interpolation_refuses_missing_required(text: str, env: dict[str, str]) -> None:
    with pytest.raises(InterpolationError):
        interpolate(text, env)


# --------------------------------------------------------------------------- the file
@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The file as YAML (anchors and `<<` merges resolved), not interpolated."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_dotenv(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def model(raw: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """What compose works with after `cp .env.example .env`."""
    result = interpolate_tree(raw, env)
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = model["services"]
    assert isinstance(svcs, dict) and svcs
    return svcs


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's schema (compose-spec/compose-spec schema/compose-spec.json)
    as check-jsonschema ships it, read from the installed distribution's files."""
    dist = metadata.distribution("check-jsonschema")
    path = Path(str(dist.locate_file("check_jsonschema/builtin_schemas/vendor/compose-spec.json")))
    schema = json.loads(path.read_text())
    assert isinstance(schema, dict) and schema.get("title") == "Compose Specification", path
    return schema


def test_compose_file_validates_against_the_compose_spec_schema(model: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(model), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])


def test_the_schema_check_catches_a_broken_file(model: dict[str, Any]) -> None:
    """The validation above is not vacuous: a misspelt key and a wrong type fail it."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = json.loads(json.dumps(model))
    first = next(iter(broken["services"].values()))
    first["healthchek"] = first.pop("healthcheck", {})
    first["restart"] = ["always"]
    assert len(list(validator.iter_errors(broken))) >= 2


def test_env_example_sets_every_required_variable(raw: dict[str, Any], env: dict[str, str]) -> None:
    """`cp .env.example .env` is enough: every `${VAR:?...}` has a value there."""
    required = {m for text in strings(raw) for m in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text)}
    assert required, "the file requires nothing?"
    missing = sorted(v for v in required if not env.get(v))
    assert not missing, f"required by docker-compose.yml, unset or empty in .env.example: {missing}"


# --------------------------------------------------------------------------- health
def one_shot_jobs(services: Mapping[str, dict[str, Any]]) -> set[str]:
    """Services that others wait for with service_completed_successfully: they run,
    exit 0 and are done, so a healthcheck means nothing for them."""
    jobs: set[str] = set()
    for svc in services.values():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, dict):
            jobs |= {name for name, d in deps.items() if (d or {}).get("condition") == "service_completed_successfully"}
    return jobs


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    jobs = one_shot_jobs(services)
    missing = []
    for name, svc in services.items():
        if name in jobs:
            assert svc.get("restart") in (None, "no"), f"{name} is a one-shot job: it must not restart"
            continue
        check = svc.get("healthcheck") or {}
        test = check.get("test")
        if check.get("disable") or not test or test in (["NONE"], "NONE"):
            missing.append(name)
        else:
            assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
    assert not missing, f"services without a healthcheck: {missing}"


def test_every_dependency_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    jobs = one_shot_jobs(services)
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: depends_on as a list only waits for the start"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = (spec or {}).get("condition")
            expected = "service_completed_successfully" if dep in jobs else "service_healthy"
            assert condition == expected, f"{name} -> {dep}: condition {condition!r}, want {expected}"


# Services that name NATS but do not need it to start: the edge connects on the first
# reload (POST /v1/admin/reload answers 503 reload_unavailable until NATS is there).
NATS_ON_DEMAND = {"edge"}


def test_what_needs_redis_and_nats_waits_for_them(services: dict[str, dict[str, Any]]) -> None:
    """A service whose settings name Redis or NATS waits for it to be healthy (the
    cluster's `nats-cluster` alias needs the nats-cluster profile, so it is exempt),
    but for the edge and NATS: it starts, and serves, without it."""
    for name, svc in services.items():
        env = environment(svc)
        deps = svc.get("depends_on") or {}
        if any(str(v).startswith(("redis://", "rediss://")) for v in env.values()):
            assert "redis" in deps, f"{name} uses Redis without waiting for it"
        nats = [str(v) for k, v in env.items() if k.endswith("NATS_URL")]
        if name in NATS_ON_DEMAND:
            assert nats, f"{name} names no NATS: drop it from NATS_ON_DEMAND"
            assert "nats" not in deps, f"{name} connects to NATS on demand: it must not wait for it to start"
        elif nats and not any("nats-cluster" in v for v in nats):
            assert "nats" in deps, f"{name} uses NATS without waiting for it"


def test_hoosh_healthchecks_use_the_images_python3(raw: dict[str, Any]) -> None:
    """Every hoosh image has python3 (python:* bases and vLLM's image alike; vLLM's has no
    `python`), so every probe of a service built from a Dockerfile here runs python3,
    and that Dockerfile's final stage has it."""
    jobs = one_shot_jobs(raw["services"])
    for name, svc in raw["services"].items():
        build = svc.get("build")
        if not isinstance(build, dict) or "dockerfile" not in build or name in jobs:
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python3", f"{name}: {test[:2]}"
        dockerfile = (ROOT / build.get("context", ".") / build["dockerfile"]).read_text()
        final = dockerfile.rsplit("\nFROM ", 1)[-1]
        base = final.split()[0]
        assert base.startswith("python:") or '"python3"' in final, f"{name}: does {base} have python3?"


# --------------------------------------------------------------------------- images
EXACT_TAG = re.compile(r"^v?\d+\.\d+\.\d+(?:[.+-][A-Za-z0-9._-]+)?$")


def image_is_pinned(ref: str) -> bool:
    """A digest, or a tag naming one exact release (x.y.z, maybe with a variant such as
    -alpine): never `latest`, no tag at all, or a moving major/minor tag such as 7.4."""
    if re.search(r"@sha256:[0-9a-f]{64}$", ref):
        return True
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return False
    return bool(EXACT_TAG.match(tag))


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("redis:7.4.6-alpine", True),
        ("redis@sha256:" + "a" * 64, True),
        ("prom/prometheus:v3.12.0", True),
        ("redis", False),
        ("redis:latest", False),
        ("redis:7", False),
        ("redis:7.4-alpine", False),
        ("localhost:5000/redis", False),
    ],
)
def test_image_pin_rule(ref: str, pinned: bool) -> None:
    assert image_is_pinned(ref) is pinned


def dockerfile_bases(text: str) -> list[str]:
    """The external images a Dockerfile builds FROM (stages named with AS excluded)."""
    stages: set[str] = set()
    bases = []
    for line in text.splitlines():
        m = re.match(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            if m.group(1) not in stages:
                bases.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    return bases


def pulled_images(services: Mapping[str, dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(service, image) for every image compose pulls, including the bases of what it builds."""
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            yield name, svc["image"]
            continue
        if isinstance(build, str):
            build = {"context": build}
        if "dockerfile_inline" in build:
            text = build["dockerfile_inline"]
        else:
            text = (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).read_text()
        for base in dockerfile_bases(text):
            yield name, base


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    loose = [f"{svc}: {ref}" for svc, ref in pulled_images(services) if not image_is_pinned(ref)]
    assert not loose, f"images not pinned to a digest or an exact release: {loose}"


def _version(tag: str) -> tuple[int, int, int]:
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", tag)
    assert m, tag
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


# (image, release line) -> first release with the fix, and why.
FIXED_IN: dict[str, tuple[dict[tuple[int, int], tuple[int, int, int]], tuple[int, int, int], str]] = {
    # CVE-2025-49844 (Lua use-after-free, remote code execution), with CVE-2025-46817/46818/46819.
    "redis": (
        {(6, 2): (6, 2, 20), (7, 2): (7, 2, 11), (7, 4): (7, 4, 6), (8, 0): (8, 0, 4), (8, 2): (8, 2, 2)},
        (8, 2, 2),
        "CVE-2025-49844",
    ),
    # CVE-2025-30215 (JetStream API: management requests across accounts).
    "nats": ({(2, 10): (2, 10, 27), (2, 11): (2, 11, 1)}, (2, 11, 1), "CVE-2025-30215"),
}


def test_no_image_release_with_a_known_advisory(services: dict[str, dict[str, Any]]) -> None:
    for svc, ref in pulled_images(services):
        if "@" in ref:
            continue
        name, _, tag = ref.rpartition(":")
        rule = FIXED_IN.get(name.removeprefix("docker.io/").removeprefix("library/"))
        if rule is None:
            continue
        lines, newest_fix, advisory = rule
        version = _version(tag)
        line = (version[0], version[1])
        fixed = lines.get(line, newest_fix if line > max(lines) else None)
        assert fixed is not None and version >= fixed, f"{svc}: {ref} has {advisory} (fixed in {fixed})"


# --------------------------------------------------------------------------- secrets
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|CALLERS|(^|_)KEYS?($|_)")
# Credentials of outside providers: optional (an unset key leaves that provider out of
# service; hoosh.yaml decides which ones are used), so empty is allowed for these only.
OPTIONAL_PROVIDER_KEYS = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"}
# Names that match the pattern but are no secret (key ids, file paths), or may be empty
# (retired event keys kept only while old events remain: none is the usual case).
# The internal plane's TLS variables name files (the key is a path in the certs volume).
NOT_SECRET = re.compile(r"_ID$|_KEYS_RETIRED$|^HOOSH_GRPC_TLS_")


def environment(svc: Mapping[str, Any]) -> dict[str, Any]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return dict(env)


URL_PASSWORD = re.compile(r"^[a-z]+://[^@/]*:(\$\{[^@]*)@")


def secret_entries(services: Mapping[str, dict[str, Any]]) -> Iterator[tuple[str, str, Any]]:
    """Entries named like a secret, and URLs with a password from a variable in them."""
    for name, svc in services.items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key) and not NOT_SECRET.search(key) and key not in OPTIONAL_PROVIDER_KEYS:
                yield name, key, value
            elif m := URL_PASSWORD.match(str(value)):
                yield name, key, m.group(1)


def test_no_secret_is_empty(services: dict[str, dict[str, Any]]) -> None:
    entries = list(secret_entries(services))
    assert len(entries) >= 10, entries
    for where, key, value in entries:
        text = "" if value is None else str(value).strip()
        assert text, f"{where}: {key} is empty"
        for part in re.split(r"[,\s]+", text):
            if "=" in part and key.endswith("CALLERS"):
                assert part.split("=", 1)[1], f"{where}: {key} has an empty entry {part!r}"
    # A password inside a URL (redis://user:password@host) is a secret too.
    for name, svc in services.items():
        for key, value in environment(svc).items():
            m = re.match(r"^[a-z]+://([^@/]*)@", str(value))
            if m and ":" in m.group(1):
                assert m.group(1).split(":", 1)[1], f"{name}: {key} carries an empty password"


def test_every_secret_is_required_not_defaulted(raw: dict[str, Any]) -> None:
    """Without .env, compose refuses to start rather than run with an empty or default
    secret: every variable a secret is built from is `${VAR:?...}` somewhere in the
    file, and never given a default."""
    all_text = "\n".join(strings(raw))
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", all_text))
    for svc, key, value in secret_entries(raw["services"]):
        names = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", str(value).replace("$$", ""))
        assert names, f"{svc}: {key} is written in the file, not read from .env"
        for var in names:
            if NOT_SECRET.search(var):
                continue
            assert var in required, f"{svc}: {key} uses ${{{var}}}, which nothing requires (${{{var}:?...}})"
            assert not re.search(r"\$\{" + var + r":?-", all_text), f"${{{var}}} has a default somewhere"


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


# --------------------------------------------------------------------------- internal plane
# Who calls whom over gRPC (docs/DESIGN.md): the callee accepts exactly these callers.
CALLERS = {
    "router": {"edge"},
    "budget": {"edge", "router"},
    "audit": {"edge"},
    "stt": {"edge"},
    "stt-gpu": {"edge"},
    "local-inference": {"router"},
    "local-inference-gpu": {"router"},
}


TOKEN_CALLERS = ("edge", "router")
DIGEST_ENTRY = re.compile(r"sha256:([0-9a-f]{64})")
# A token as written in the file: ${HOOSH_INTERNAL_TOKEN_EDGE...}, not its _SHA256.
TOKEN_REFERENCE = re.compile(r"\$\{?HOOSH_INTERNAL_TOKEN_([A-Z]+)(?![A-Z0-9_])")


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def internal_plane_problems(
    raw_services: Mapping[str, dict[str, Any]], services: Mapping[str, dict[str, Any]], env: Mapping[str, str]
) -> list[str]:
    """Each caller presents a token of its own; each callee accepts exactly its callers,
    by sha256:<hex of the token's SHA-256> only; the digests in .env are those of the
    tokens there; no service but the edge holds the edge's token (as written in the file
    or after interpolation), none but the router the router's."""
    problems = []
    tokens = {name: str(environment(services[name]).get("HOOSH_INTERNAL_TOKEN") or "") for name in TOKEN_CALLERS}
    for name, token in tokens.items():
        if len(token) < 16 or "," in token:
            problems.append(f"{name}: HOOSH_INTERNAL_TOKEN {token!r}")
    if tokens["edge"] == tokens["router"]:
        problems.append("each caller needs its own token")
    for name in TOKEN_CALLERS:
        variable = f"HOOSH_INTERNAL_TOKEN_{name.upper()}"
        if env.get(f"{variable}_SHA256") != _sha256(env.get(variable, "")):
            problems.append(f".env: {variable}_SHA256 is not the SHA-256 of {variable}")
    for callee, expected in CALLERS.items():
        text = environment(services[callee]).get("HOOSH_INTERNAL_CALLERS")
        if not text:
            problems.append(f"{callee}: no HOOSH_INTERNAL_CALLERS (it would answer anyone)")
            continue
        accepted = dict(entry.split("=", 1) for entry in str(text).split(","))
        if set(accepted) != expected:
            problems.append(f"{callee} accepts {sorted(accepted)}, want {sorted(expected)}")
        for caller, entry in accepted.items():
            match = DIGEST_ENTRY.fullmatch(entry)
            if match is None:
                problems.append(f"{callee} lists {caller} by a raw token, not sha256:<hex>")
            elif caller in tokens and match.group(1) != _sha256(tokens[caller]):
                problems.append(f"{callee} does not accept the token {caller} presents")
    for name, svc in raw_services.items():
        for owner in {m.lower() for text in strings(svc) for m in TOKEN_REFERENCE.findall(text)} - {name}:
            problems.append(f"{name}: is given the raw token of {owner} (${{HOOSH_INTERNAL_TOKEN_{owner.upper()}}})")
    for name, svc in services.items():
        for owner, token in tokens.items():
            if owner != name and token and any(token in text for text in strings(svc)):
                problems.append(f"{name}: holds the raw token of {owner}")
    return problems


def test_internal_plane_callees_accept_the_digests_of_the_callers_tokens(
    raw: dict[str, Any], services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    problems = internal_plane_problems(raw["services"], services, env)
    assert not problems, "\n".join(problems)


def test_the_internal_plane_check_catches_a_raw_token_and_a_stale_digest(
    raw: dict[str, Any], env: dict[str, str]
) -> None:
    """A callee given the edge's raw token (listed by it, or only holding it), and a
    digest in .env that is not its token's, are each found."""
    raw_token = "${HOOSH_INTERNAL_TOKEN_EDGE:?set it}"
    listed = f"edge={raw_token},router=sha256:${{HOOSH_INTERNAL_TOKEN_ROUTER_SHA256}}"
    for callee, change, listed_by_token in (
        ("budget", {"HOOSH_INTERNAL_CALLERS": listed}, True),
        ("audit", {"HOOSH_INTERNAL_TOKEN_EDGE": raw_token}, False),
    ):
        broken = json.loads(json.dumps(raw["services"]))
        broken[callee]["environment"].update(change)
        problems = internal_plane_problems(broken, interpolate_tree(broken, env), env)
        assert any(f"{callee}: is given the raw token of edge" in p for p in problems), problems
        assert any(f"{callee}: holds the raw token of edge" in p for p in problems), problems
        assert any(f"{callee} lists edge by a raw token" in p for p in problems) is listed_by_token, problems
    stale = {**env, "HOOSH_INTERNAL_TOKEN_ROUTER": "another-router-token-0123456789"}
    problems = internal_plane_problems(raw["services"], interpolate_tree(raw["services"], stale), stale)
    assert any("HOOSH_INTERNAL_TOKEN_ROUTER_SHA256 is not the SHA-256" in p for p in problems), problems
    assert any("budget does not accept the token router presents" in p for p in problems), problems


# --------------------------------------------------------------------------- internal TLS
def test_every_hoosh_service_speaks_mutual_tls_with_a_certificate_for_the_name_it_is_dialled_by(
    services: dict[str, dict[str, Any]],
) -> None:
    """Every hoosh container (a service built here, not a job) has the three TLS files
    from the certs volume, named for the host the others dial it by (an *_ADDR host, or
    a network alias), which the certs job makes; a gRPC server probes its plaintext
    health port, the one HOOSH_GRPC_HEALTH_LISTEN binds."""
    jobs = one_shot_jobs(services)
    certs = services["certs"]
    made = set(re.search(r"--names\s+(\S+)", " ".join(certs["command"])).group(1).split(","))  # type: ignore[union-attr]
    dialled: dict[str, str] = {}
    for svc in services.values():
        for key, value in environment(svc).items():
            if key.endswith("_ADDR") and value:
                dialled[str(value).rsplit(":", 1)[0]] = key
    checked = 0
    for name, svc in services.items():
        if (
            not isinstance(svc.get("build"), dict)
            or name in jobs
            or not name.startswith(("edge", "router", "budget", "audit", "local-", "stt"))
        ):
            continue
        env = environment(svc)
        aliases = set(((svc.get("networks") or {}).get("default") or {}).get("aliases") or [])
        cert = Path(env["HOOSH_GRPC_TLS_CERT"]).name.removesuffix(".pem")
        assert cert in made, f"{name}: the certs job makes no {cert}.pem"
        assert env["HOOSH_GRPC_TLS_KEY"] == f"/etc/hoosh/tls/{cert}-key.pem", name
        assert env["HOOSH_GRPC_TLS_CA"] == "/etc/hoosh/tls/ca.pem", name
        # Only its own directory of the volume (the certs job's /tls/<cert>), read-only.
        assert tls_mounts(svc) == [
            {
                "type": "volume",
                "source": "tls",
                "target": "/etc/hoosh/tls",
                "read_only": True,
                "volume": {"subpath": cert, "nocopy": True},
            }
        ], name
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully", name
        if name != "edge":  # the edge only calls; every other one is dialled by the certificate's name
            assert cert == name or cert in aliases, f"{name}: dialled as {name}/{aliases}, certificate for {cert}"
            assert cert in dialled, f"{name}: nobody dials {cert}"
            health = env["HOOSH_GRPC_HEALTH_LISTEN"]
            assert health.startswith("127.0.0.1:"), f"{name}: the health-only port stays in the container"
            assert svc["healthcheck"]["test"][-1] == health.rsplit(":", 1)[1], f"{name}: probes another port"
        checked += 1
    assert checked >= 7, checked


def tls_mounts(svc: Mapping[str, Any]) -> list[Any]:
    """The service's mounts of the `tls` volume (short or long syntax)."""
    found = []
    for volume in svc.get("volumes") or []:
        source = volume.get("source") if isinstance(volume, dict) else str(volume).split(":", 1)[0]
        if source == "tls":
            found.append(volume)
    return found


def test_only_the_certs_job_mounts_the_whole_tls_volume(services: dict[str, dict[str, Any]]) -> None:
    """Everything else mounts one directory of it (a subpath), never the root (where the
    certs job keeps every service's key, in .staging) nor another service's directory."""
    assert tls_mounts(services["certs"]) == ["tls:/tls"]
    for name, svc in services.items():
        if name == "certs":
            continue
        for mount in tls_mounts(svc):
            assert isinstance(mount, dict), f"{name} mounts the whole tls volume: {mount}"
            subpath = (mount.get("volume") or {}).get("subpath", "")
            assert subpath and "/" not in subpath and not subpath.startswith("."), f"{name}: {mount}"
            assert mount.get("read_only") is True, f"{name}: {mount}"


def _run_certs_job(script: str, root: Path, tools: Path) -> None:
    result = subprocess.run(
        ["sh", "-c", script],
        env={**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_certs_job_gives_each_service_a_directory_of_its_own(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The certs job's script, run here on a directory standing for the volume (python3
    this interpreter, chown a stand-in that records its calls): each service's directory
    holds its certificate, its key and the CA, nothing else, owned by uid 10001; a
    second run keeps them (--keep); the flat layout of earlier versions is removed."""
    from hoosh_common.devca import still_valid

    certs = services["certs"]
    assert certs["entrypoint"] == ["sh", "-c"]
    (script,) = certs["command"]
    names = re.search(r"--names\s+(\S+)", script).group(1).split(",")  # type: ignore[union-attr]
    root, tools = tmp_path / "tls", tmp_path / "bin"
    root.mkdir()
    tools.mkdir()
    log = tmp_path / "chown.log"
    (tools / "chown").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (tools / "chown").chmod(0o755)
    script = script.replace("/tls", str(root)).replace("python3 -m ", f"{sys.executable} -m ")
    (root / "router-key.pem").write_text("a key of the flat layout")

    _run_certs_job(script, root, tools)
    assert sorted(path.name for path in root.iterdir()) == sorted([".staging", *names])
    chowned = log.read_text().split("\n")
    first = {}
    for name in names:
        directory = root / name
        files = {"ca.pem", f"{name}.pem", f"{name}-key.pem"}
        assert {path.name for path in directory.iterdir()} == files, name
        assert still_valid(directory, [name]), name
        assert (directory / "ca.pem").read_bytes() == (root / ".staging" / "ca.pem").read_bytes(), name
        assert directory.stat().st_mode & 0o777 == 0o700, name
        assert (directory / f"{name}-key.pem").stat().st_mode & 0o077 == 0, name
        assert f"10001:10001 {directory}" in chowned, name
        assert all(f"10001:10001 {directory}/.{file}.tmp" in chowned for file in files), name
        first[name] = {file: (directory / file).read_bytes() for file in files}

    _run_certs_job(script, root, tools)
    for name in names:
        assert {file: (root / name / file).read_bytes() for file in first[name]} == first[name], name
