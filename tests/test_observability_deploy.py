"""Static checks of the observability deployment (issue 11, Dashboards): the Grafana
dashboards, the metric catalogue in docs/observability.md, the Prometheus and
OpenTelemetry Collector configs, the compose profile `observability` and the Kustomize
wiring (scrape annotations, `metrics` ports, ServiceMonitors, OTEL env).

Nothing here runs a container or a cluster: files are parsed and cross-checked, and
the Kustomize manifests are rendered with `kubectl kustomize` when kubectl is present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OBSERVABILITY = DEPLOY / "observability"
DASHBOARD_DIR = OBSERVABILITY / "grafana" / "dashboards"
PROVISIONING_DIR = OBSERVABILITY / "grafana" / "provisioning"
DOC = ROOT / "docs" / "observability.md"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Each service's metrics port: its compose/Kubernetes name -> (listen variable, port).
METRICS_PORTS: dict[str, tuple[str, int]] = {
    "edge": ("HOOSH_EDGE_METRICS_LISTEN", 9460),
    "router": ("HOOSH_ROUTER_METRICS_LISTEN", 9461),
    "budget": ("HOOSH_BUDGET_METRICS_LISTEN", 9462),
    "local-inference": ("HOOSH_INFERENCE_METRICS_LISTEN", 9463),
    "audit": ("HOOSH_AUDIT_METRICS_LISTEN", 9464),
    "stt": ("HOOSH_STT_METRICS_LISTEN", 9465),
}
# Compose services that are another variant of one of the six (same port, an alias).
COMPOSE_VARIANTS = {"local-inference-gpu": "local-inference", "stt-gpu": "stt"}
PROFILE_SERVICES = {"otel-collector", "prometheus", "grafana", "jaeger"}
# The container ports each profile service publishes on the host (and only these).
PUBLISHED_PORTS = {"grafana": {3000}, "prometheus": {9090}, "jaeger": {16686}, "otel-collector": {4317, 4318}}
# What every published port of the profile binds to: loopback unless .env says otherwise
# (Grafana's admin/admin and anonymous viewer are acceptable only there).
OBSERVABILITY_BIND = "${HOOSH_OBSERVABILITY_BIND:-127.0.0.1}"
REQUIRED_DASHBOARDS = {
    "hoosh-traffic",
    "hoosh-latency",
    "hoosh-tokens",
    "hoosh-cost",
    "hoosh-budgets",
    "hoosh-providers",
    "hoosh-audit",
}
METRIC_TYPES = {"counter", "gauge", "histogram"}
# The catalogue's type cell `gauge (shared)`: a snapshot of shared state (Redis, JetStream)
# that every replica reports with the same value, so it is taken with max across instances.
SHARED_MARKER = "(shared)"
# At least these are shared: every budget replica exports the same Redis snapshot.
SHARED_REQUIRED = {
    "hoosh_pool_capacity_tokens",
    "hoosh_pool_used_tokens",
    "hoosh_pool_reserved_tokens",
    "hoosh_pool_capacity_usd_micros",
    "hoosh_pool_used_usd_micros",
    "hoosh_pool_reserved_usd_micros",
    "hoosh_pool_open_reservations",
    "hoosh_budget_open_reservations",
    "hoosh_budget_pools",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Labels every scraped series has (target labels), or the histogram bucket bound.
IMPLICIT_LABELS = {"job", "instance", "le"}
DATASOURCE_UIDS = {"${datasource}", "$datasource"}


# -- helpers ----------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def _dashboards() -> dict[str, dict[str, Any]]:
    """File name -> parsed dashboard JSON."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside (collapsed) rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"docs/observability.md has no <!-- {name}:start --> ... <!-- {name}:end --> section"
    return match.group(1)


def _table_rows(section: str) -> Iterator[list[str]]:
    """The cells of every table row whose first cell is a `code` name."""
    for line in section.splitlines():
        line = line.strip()
        if line.startswith("| `"):
            yield [cell.strip() for cell in line.strip("|").split("|")]


def _backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@cache
def _catalogue() -> dict[str, dict[str, Any]]:
    """The metric catalogue of docs/observability.md: name -> type, labels, dashboards."""
    catalogue: dict[str, dict[str, Any]] = {}
    for cells in _table_rows(_section(DOC.read_text(), "metric-catalogue")):
        assert len(cells) == 5, f"catalogue row needs 5 cells (metric, type, labels, meaning, dashboards): {cells}"
        name = _backticked(cells[0])[0]
        assert name not in catalogue, f"{name} is in the catalogue twice"
        kind = cells[1].lower()
        shared = kind.endswith(SHARED_MARKER)
        kind = kind.removesuffix(SHARED_MARKER).strip()
        assert kind in METRIC_TYPES, f"{name}: type {kind!r} is not one of {sorted(METRIC_TYPES)}"
        assert not shared or kind == "gauge", f"{name}: only a gauge can be a shared snapshot"
        if kind == "counter":
            assert name.endswith("_total"), f"{name}: a counter's exposed name ends in _total"
        if kind == "histogram":
            assert not name.endswith(HISTOGRAM_SERIES), f"{name}: list a histogram by its base name"
        catalogue[name] = {
            "type": kind,
            "shared": shared,
            "labels": set(_backticked(cells[2])),
            "dashboards": set(_backticked(cells[4])),
        }
    assert catalogue, "the metric catalogue is empty"
    return catalogue


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def _promql_names(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(series names, label names matched per selector name, grouping labels) of a PromQL
    expression. Grafana variables ($model, $__rate_interval) are left as they are."""
    plain = _STRING.sub('""', expr)
    matched: dict[str, set[str]] = {}
    for name, body in _SELECTOR.findall(plain):
        matched.setdefault(name, set()).update(_MATCHER.findall(body))
    grouping = {label.strip() for _, labels in _GROUPING.findall(plain) for label in labels.split(",") if label.strip()}
    bare = _GROUPING.sub(" ", _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", plain))
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    names = {
        name
        for name, call in _IDENT.findall(bare)
        if not call and name not in _KEYWORDS and not re.fullmatch(r"(?i)inf|nan", name)
    }
    return names, matched, grouping


_AGGREGATION = re.compile(r"\b(sum|count|max|min|avg|group)\s*(?:(by|without)\s*\(([^)]*)\)\s*)?\(")
_TRAILING_GROUPING = re.compile(r"\s*(by|without)\s*\(([^)]*)\)")


def _closing_paren(text: str, opening: int) -> int:
    """The index of the `)` that closes the `(` at `opening`."""
    depth = 0
    for index in range(opening, len(text)):
        depth += (text[index] == "(") - (text[index] == ")")
        if depth == 0:
            return index
    raise AssertionError(f"unbalanced parentheses in {text}")


def _instance_aggregators(expr: str, metric: str) -> list[str | None]:
    """For each place `metric` appears in `expr`, the aggregation operator that merges its
    instances (the innermost sum/count/max/min/avg/group whose grouping drops `instance`),
    or None when its instances stay apart."""
    plain = _STRING.sub('""', expr)
    spans: list[tuple[int, int, str]] = []
    for match in _AGGREGATION.finditer(plain):
        operator, grouping, labels = match.group(1), match.group(2), match.group(3) or ""
        opening = match.end() - 1
        closing = _closing_paren(plain, opening)
        trailing = _TRAILING_GROUPING.match(plain, closing + 1)
        if grouping is None and trailing:
            grouping, labels = trailing.group(1), trailing.group(2)
        kept = {label.strip() for label in labels.split(",")}
        merges = grouping is None or (grouping == "by") != ("instance" in kept)
        if merges:
            spans.append((opening, closing, operator))
    operators: list[str | None] = []
    for occurrence in re.finditer(rf"(?<![\w:$]){re.escape(metric)}(?![\w:])", plain):
        enclosing = [span for span in spans if span[0] < occurrence.start() < span[1]]
        operators.append(max(enclosing)[2] if enclosing else None)
    return operators


def _base_metric(series: str) -> str | None:
    """The catalogue entry a series name belongs to (a histogram's _bucket/_sum/_count
    to the histogram), or None."""
    catalogue = _catalogue()
    if series in catalogue:
        return series
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if series.endswith(suffix) and catalogue.get(base, {}).get("type") == "histogram":
            return base
    return None


def _dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r}", target.get("expr", "")
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*([a-zA-Z_]\w*)\s*\)\s*", text)
        assert match, f"variable {variable.get('name')!r}: expected label_values(metric, label), got {text!r}"
        yield f"variable {variable.get('name')!r}", f"group by ({match.group(2)}) ({match.group(1)})"


def _dashboard_metrics() -> dict[str, set[str]]:
    """Catalogue metric -> uids of the dashboards that query it."""
    used: dict[str, set[str]] = {}
    for dashboard in _dashboards().values():
        for _, expr in _dashboard_queries(dashboard):
            for series in _promql_names(expr)[0]:
                base = _base_metric(series)
                if base is not None:
                    used.setdefault(base, set()).add(dashboard["uid"])
    return used


@cache
def _compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE_FILE)


def _compose_default_path(value: str) -> str:
    """`${VAR:-./file}` -> ./file (what compose reads when VAR is unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


# -- dashboards -----------------------------------------------------------------------------


def test_every_required_dashboard_exists_with_a_unique_uid_and_title() -> None:
    dashboards = _dashboards()
    uids = [dashboard.get("uid") for dashboard in dashboards.values()]
    assert len(uids) == len(set(uids)), f"duplicate dashboard uids: {uids}"
    assert REQUIRED_DASHBOARDS <= set(uids), f"missing dashboards: {sorted(REQUIRED_DASHBOARDS - set(uids))}"
    for name, dashboard in dashboards.items():
        assert isinstance(dashboard.get("uid"), str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"]), name
        assert name == f"{dashboard['uid']}.json", f"{name}: name the file after its uid"
        assert isinstance(dashboard.get("title"), str) and dashboard["title"].strip(), f"{name}: no title"
        assert isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 39, name
        # Provisioned dashboards must not carry a database id.
        assert dashboard.get("id") is None, f"{name}: id must be null"
        assert "hoosh" in dashboard.get("tags", []), f"{name}: tag it `hoosh` (the dashboards' links use the tag)"


def test_every_dashboard_picks_its_prometheus_through_a_datasource_variable() -> None:
    for name, dashboard in _dashboards().items():
        variables = {variable.get("name"): variable for variable in dashboard.get("templating", {}).get("list", [])}
        datasource = variables.get("datasource")
        assert datasource is not None, f"{name}: no $datasource variable"
        assert datasource.get("type") == "datasource" and datasource.get("query") == "prometheus", name
        for variable in variables.values():
            if variable.get("type") == "query":
                assert variable.get("datasource", {}).get("uid") in DATASOURCE_UIDS, f"{name}: {variable['name']}"


def test_every_panel_has_a_datasource_a_position_and_queries() -> None:
    for name, dashboard in _dashboards().items():
        ids: set[int] = set()
        cells: dict[tuple[int, int], str] = {}
        for panel in _panels(dashboard):
            title = panel.get("title")
            where = f"{name}: panel {title!r}"
            assert isinstance(title, str) and title.strip(), f"{name}: a panel without a title"
            assert isinstance(panel.get("id"), int) and panel["id"] not in ids, f"{where}: id missing or repeated"
            ids.add(panel["id"])
            grid = panel.get("gridPos", {})
            assert all(isinstance(grid.get(key), int) for key in ("h", "w", "x", "y")), f"{where}: gridPos {grid}"
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, where
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{where} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = str(title)
            if panel.get("type") == "row":
                continue
            assert panel.get("datasource", {}).get("uid") in DATASOURCE_UIDS, f"{where}: datasource"
            targets = panel.get("targets") or []
            assert targets, f"{where}: no targets"
            ref_ids = [target.get("refId") for target in targets]
            assert len(ref_ids) == len(set(ref_ids)) and all(ref_ids), f"{where}: refIds {ref_ids}"
            for target in targets:
                expr = target.get("expr")
                assert isinstance(expr, str) and expr.strip(), f"{where}: a target without expr"
                assert target.get("datasource", {}).get("uid", "${datasource}") in DATASOURCE_UIDS, where


def test_every_query_is_balanced_and_rates_only_counters_and_histograms() -> None:
    catalogue = _catalogue()
    for name, dashboard in _dashboards().items():
        for where, expr in _dashboard_queries(dashboard):
            plain = _STRING.sub('""', expr)
            for opening, closing in ("()", "{}", "[]"):
                depth = 0
                for char in plain:
                    depth += (char == opening) - (char == closing)
                    assert depth >= 0, f"{name} {where}: unbalanced {opening}{closing} in {expr}"
                assert depth == 0, f"{name} {where}: unbalanced {opening}{closing} in {expr}"
            for series in re.findall(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", plain):
                base = _base_metric(series)
                kind = catalogue[base]["type"] if base else None
                assert kind in ("counter", "histogram"), f"{name} {where}: rate() of {series} ({kind})"


def test_every_metric_the_dashboards_query_is_in_the_catalogue() -> None:
    catalogue = _catalogue()
    missing: list[str] = []
    for name, dashboard in _dashboards().items():
        for where, expr in _dashboard_queries(dashboard):
            names, matched, grouping = _promql_names(expr)
            assert names, f"{name} {where}: no metric in {expr}"
            bases = set()
            for series in names:
                base = _base_metric(series)
                if base is None:
                    missing.append(f"{name} {where}: {series}")
                    continue
                bases.add(base)
                if series.endswith("_bucket") and base != series:
                    assert "le" in grouping, f"{name} {where}: {series} aggregated without `le`"
            for series, labels in matched.items():
                base = _base_metric(series)
                if base is not None:
                    unknown = labels - catalogue[base]["labels"] - IMPLICIT_LABELS
                    assert not unknown, f"{name} {where}: {series} has no label(s) {sorted(unknown)} in the catalogue"
            if bases:
                known = set().union(*(catalogue[base]["labels"] for base in bases)) | IMPLICIT_LABELS
                unknown = grouping - known
                assert not unknown, f"{name} {where}: grouping by {sorted(unknown)}, which no metric of {expr} has"
    assert not missing, "metrics queried but not in docs/observability.md's catalogue:\n" + "\n".join(missing)


def test_the_catalogue_says_which_dashboards_use_each_metric() -> None:
    used = _dashboard_metrics()
    wrong = []
    for metric, entry in _catalogue().items():
        actual = {uid.removeprefix("hoosh-") for uid in used.get(metric, set())}
        if actual != entry["dashboards"]:
            wrong.append(f"{metric}: the catalogue says {sorted(entry['dashboards'])}, the dashboards {sorted(actual)}")
    assert not wrong, "docs/observability.md's `dashboards` column is out of date:\n" + "\n".join(wrong)


def test_the_promql_reader_finds_metrics_and_labels() -> None:
    names, matched, grouping = _promql_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(hoosh_x_seconds_bucket{model=~"$model", a!="b"}'
        "[$__rate_interval]))) / 1e6 or vector(0) > bool 2 * up"
    )
    assert names == {"hoosh_x_seconds_bucket", "up"}
    assert matched == {"hoosh_x_seconds_bucket": {"model", "a"}}
    assert grouping == {"le", "model"}


def test_the_aggregation_reader_finds_what_merges_the_instances() -> None:
    assert _instance_aggregators('sum by (pool) (a{pool=~"$pool"}) / max by (pool) (b)', "a") == ["sum"]
    assert _instance_aggregators('sum by (pool) (a{pool=~"$pool"}) / max by (pool) (b)', "b") == ["max"]
    assert _instance_aggregators("count((max by (pool) (a) / (max by (pool) (b) > 0)) > 0.9) or vector(0)", "a") == [
        "max"
    ]
    assert _instance_aggregators("sum(max by (pool) (a)) + max(sum by (pool) (a))", "a") == ["max", "sum"]
    assert _instance_aggregators("sum by (instance, pool) (a) + sum without (pool) (a) + a", "a") == [None, None, None]
    assert _instance_aggregators("sum without (instance) (a) + sum(a) by (job) + sum(a) by (instance)", "a") == [
        "sum",
        "sum",
        None,
    ]
    assert _instance_aggregators('sum_over_time(a[5m]) + count_values("v", a) + sum(a_b) + sum(b_a)', "a") == [
        None,
        None,
    ]


def test_no_dashboard_sums_a_gauge_that_every_replica_reports_alike() -> None:
    """A shared snapshot (the pool gauges: every budget replica exports the same Redis
    state) summed or counted across instances is multiplied by the replica count: take
    it with max. Per-process gauges (in flight, queue depth, outbox depth) are summed."""
    catalogue = _catalogue()
    shared = {name for name, entry in catalogue.items() if entry["shared"]}
    assert SHARED_REQUIRED <= shared, (
        f"mark {sorted(SHARED_REQUIRED - shared)} `gauge {SHARED_MARKER}` in the catalogue"
    )
    wrong = []
    for name, dashboard in _dashboards().items():
        for where, expr in _dashboard_queries(dashboard):
            for metric in sorted(shared):
                for series in (metric, *(metric + suffix for suffix in HISTOGRAM_SERIES)):
                    operators = _instance_aggregators(expr, series)
                    if {"sum", "count"} & set(operators):
                        wrong.append(f"{name} {where}: {operators} of {series} in {expr}")
    assert not wrong, "shared gauges summed across instances (use max by (...)):\n" + "\n".join(wrong)


# -- docs ----------------------------------------------------------------------------------


def test_the_docs_list_the_six_metrics_ports() -> None:
    rows = {
        _backticked(cells[0])[0]: (_backticked(cells[1])[0], _backticked(cells[2])[0])
        for cells in _table_rows(_section(DOC.read_text(), "metrics-ports"))
    }
    documented = {service: (env, int(listen.rsplit(":", 1)[1])) for service, (env, listen) in rows.items()}
    assert documented == METRICS_PORTS


def test_the_catalogue_covers_every_service_of_the_brief() -> None:
    catalogue = _catalogue()
    for metric in (
        "hoosh_http_requests_total",
        "hoosh_inference_requests_total",
        "hoosh_cost_usd_micros_total",
        "hoosh_pool_capacity_tokens",
        "gen_ai_server_request_duration_seconds",
        "hoosh_stt_requests_total",
        "hoosh_audit_lag_events",
        "hoosh_events_outbox_entries",
        "grpc_server_handled_total",
        "process_resident_memory_bytes",
    ):
        assert metric in catalogue, metric
    assert catalogue["gen_ai_client_token_usage"]["type"] == "histogram"
    assert "key_id" in catalogue["hoosh_key_requests_total"]["labels"]


# -- Prometheus and the collector ----------------------------------------------------------


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    config = _load_yaml(OBSERVABILITY / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "duplicate job names"
    for service, (_, port) in METRICS_PORTS.items():
        job = jobs.get(service)
        assert job is not None, f"no scrape job named {service} (the dashboards and ServiceMonitors use the name)"
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [target for group in job.get("static_configs", []) for target in group.get("targets", [])]
        assert targets == [f"{service}:{port}"], f"{service}: targets {targets}"
        for group in job.get("static_configs", []):
            # The events metrics carry their own `service` label: a target label would rename it.
            assert "service" not in group.get("labels", {}), service
    compose_services = _compose()["services"]
    aliases = {
        alias
        for spec in compose_services.values()
        for network in (spec.get("networks") or {}).values()
        if isinstance(network, dict)
        for alias in network.get("aliases", [])
    }
    for job in jobs.values():
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in compose_services or host in aliases or host == "127.0.0.1", (
                    f"{job['job_name']}: {target}"
                )


def test_the_collector_wires_a_traces_pipeline_of_defined_components() -> None:
    config = _load_yaml(OBSERVABILITY / "otel-collector.yaml")
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317") and protocols["http"]["endpoint"].endswith(":4318")
    service = config["service"]
    for extension in service.get("extensions", []):
        assert extension in config.get("extensions", {}), f"extension {extension} is not defined"
    traces = service["pipelines"]["traces"]
    for section, key in (("receivers", "receivers"), ("processors", "processors"), ("exporters", "exporters")):
        assert traces.get(key), f"the traces pipeline has no {key}"
        for pipeline in service["pipelines"].values():
            for component in pipeline.get(key, []):
                assert component in config.get(section, {}), f"{key[:-1]} {component} is not defined"
    assert "batch" in traces["processors"]
    if "memory_limiter" in traces["processors"]:
        assert traces["processors"][0] == "memory_limiter", "memory_limiter goes first"
    kinds = {exporter.split("/")[0] for exporter in traces["exporters"]}
    assert "debug" in kinds and kinds & {"otlp", "otlp_grpc", "otlphttp", "otlp_http"}, kinds
    for exporter in traces["exporters"]:
        if exporter.split("/")[0] in ("otlp", "otlp_grpc"):
            host = config["exporters"][exporter]["endpoint"].rsplit(":", 1)[0]
            assert host in _compose()["services"], f"{exporter} sends to {host}, not a compose service"


def _version(tag: str) -> tuple[int, ...]:
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", tag)
    assert match, f"not a release tag: {tag!r}"
    return tuple(int(part) for part in match.groups())


def test_the_collector_chart_pins_the_same_image_as_compose() -> None:
    values = _load_yaml(DEPLOY / "helm" / "otel-collector-values.yaml")
    service = _compose()["services"]["otel-collector"]
    reference = service["image"]
    # Built on the collector's image (adding a probe binary): the last FROM is the one it runs.
    inline = (service.get("build") or {}).get("dockerfile_inline")
    if inline:
        reference = [line.split()[1] for line in inline.splitlines() if line.startswith("FROM ")][-1]
    repository, _, tag = reference.rpartition(":")
    image = values.get("image") or {}
    assert image.get("repository") == repository, f"the chart's image: {image}, compose: {repository}"
    assert isinstance(image.get("tag"), str) and image["tag"], "pin image.tag (a string) in otel-collector-values.yaml"
    assert image["tag"] == tag, f"the chart runs {image['tag']}, compose {tag}: bump both together"
    # `otlp_grpc` / `otlp_http` exporter names exist from collector v0.144 on.
    for config in (values["config"], _load_yaml(OBSERVABILITY / "otel-collector.yaml")):
        if any(name.split("/")[0] in ("otlp_grpc", "otlp_http") for name in config.get("exporters", {})):
            assert _version(tag) >= (0, 144, 0), f"otlp_grpc/otlp_http need collector v0.144+, pinned {tag}"


def test_grafana_provisioning_points_at_prometheus_jaeger_and_the_dashboards() -> None:
    datasources = {}
    for path in (PROVISIONING_DIR / "datasources").glob("*.yaml"):
        for source in _load_yaml(path)["datasources"]:
            datasources[source["type"]] = source
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    assert datasources["jaeger"]["url"].startswith("http://jaeger:")
    providers = [
        provider
        for path in (PROVISIONING_DIR / "dashboards").glob("*.yaml")
        for provider in _load_yaml(path)["providers"]
    ]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    mounts = dict(volume.split(":")[:2] for volume in _compose()["services"]["grafana"]["volumes"])
    assert mounts.get("./deploy/observability/grafana/dashboards") == providers[0]["options"]["path"]
    assert mounts.get("./deploy/observability/grafana/provisioning") == "/etc/grafana/provisioning"


# -- compose -------------------------------------------------------------------------------


def test_the_compose_profile_starts_the_observability_services_from_pinned_images() -> None:
    services = _compose()["services"]
    assert PROFILE_SERVICES <= set(services)
    for name in PROFILE_SERVICES:
        spec = services[name]
        assert spec.get("profiles") == ["observability"], name
        image = spec["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: pin the image ({image})"
        # The collector's image has no shell to probe with; every other one is checked.
        if name != "otel-collector":
            assert spec.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    for name, spec in services.items():
        if name in PROFILE_SERVICES:
            continue
        depends = spec.get("depends_on") or {}
        assert not PROFILE_SERVICES & set(depends), f"{name} must run without the observability profile"


def test_the_observability_ports_are_published_on_loopback_by_default() -> None:
    """Grafana (admin/admin, anonymous viewer), Prometheus, Jaeger and the collector have
    no real authentication: every port they publish binds to HOOSH_OBSERVABILITY_BIND,
    127.0.0.1 unless .env says otherwise."""
    services = _compose()["services"]
    assert set(PUBLISHED_PORTS) == PROFILE_SERVICES
    for name, expected in PUBLISHED_PORTS.items():
        spec = services[name]
        assert spec.get("network_mode") != "host", f"{name}: host networking publishes every port"
        published = set()
        for port in spec.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short syntax BIND:HOST:CONTAINER ({port})"
            assert port.startswith(f"{OBSERVABILITY_BIND}:"), f"{name}: {port} is not bound to {OBSERVABILITY_BIND}"
            parts = _compose_default_path(port).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: {port} resolves to {parts}"
            published.add(int(parts[2].split("/")[0]))
        assert published == expected, f"{name}: publishes {sorted(published)}, expected {sorted(expected)}"
    environment = services["grafana"]["environment"]
    if str(environment.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "true":
        assert environment.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer", "anonymous visitors may only view"


def test_compose_references_resolve() -> None:
    compose = _compose()
    services, configs, volumes = compose["services"], compose.get("configs", {}), compose.get("volumes", {})
    for name, spec in services.items():
        for dependency in spec.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for config in spec.get("configs", []):
            source = config["source"] if isinstance(config, dict) else config
            assert source in configs, f"{name}: config {source} is not defined"
        for volume in spec.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not defined"
    for name, config in configs.items():
        assert (ROOT / _compose_default_path(config["file"])).is_file(), f"config {name}: {config['file']}"
    collector = services["otel-collector"]
    target = collector["configs"][0]["target"]
    assert f"--config={target}" in collector["command"]
    assert compose["configs"][collector["configs"][0]["source"]]["file"] == "./deploy/observability/otel-collector.yaml"
    prometheus = services["prometheus"]
    assert f"--config.file={prometheus['configs'][0]['target']}" in prometheus["command"]


def test_compose_services_serve_metrics_and_export_traces_only_when_asked() -> None:
    services = _compose()["services"]
    for name, spec in services.items():
        service = COMPOSE_VARIANTS.get(name, name)
        if service not in METRICS_PORTS:
            continue
        env = spec["environment"]
        variable, port = METRICS_PORTS[service]
        assert env.get(variable) == f"0.0.0.0:{port}", f"{name}: {variable}={env.get(variable)}"
        # Empty unless .env sets it: traces leave only with the profile (and the variable).
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}", name
        assert str(port) not in " ".join(map(str, spec.get("ports", []))), f"{name}: the metrics port is published"
    for variant, service in COMPOSE_VARIANTS.items():
        aliases = services[variant].get("networks", {}).get("default", {}).get("aliases", [])
        assert service in aliases, f"{variant} must answer as {service} (the scrape target)"


# -- Kubernetes ----------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: no Kustomize render")


def _render(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module")
def full_render(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The dev overlay with the stt and observability components, as an overlay would use them."""
    overlay = tmp_path_factory.mktemp("overlay")

    def relative(path: Path) -> str:
        return os.path.relpath(path, overlay)

    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "hoosh-check",
                "resources": [relative(DEPLOY / "overlays" / "dev")],
                "components": [
                    relative(DEPLOY / "components" / "stt"),
                    relative(DEPLOY / "components" / "observability"),
                ],
            }
        )
    )
    return _render(overlay)


def _workloads(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] in ("Deployment", "StatefulSet")}


def _check_scrape_wiring(documents: list[dict[str, Any]], names: set[str]) -> None:
    workloads = _workloads(documents)
    services = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Service"}
    assert names <= set(workloads), sorted(names - set(workloads))
    for name in names:
        variable, port = METRICS_PORTS[name]
        pod = workloads[name]["spec"]["template"]
        annotations = pod["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == str(port), name
        assert annotations.get("prometheus.io/path") == "/metrics", name
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("metrics") == port, f"{name}: container ports {ports}"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get(variable) == f"0.0.0.0:{port}", f"{name}: {variable}"
        service_ports = {p["name"]: p for p in services[name]["spec"]["ports"]}
        assert service_ports.get("metrics", {}).get("port") == port, f"Service {name}: {service_ports}"
        assert service_ports["metrics"].get("targetPort") in ("metrics", port), name


@needs_kubectl
def test_the_base_annotates_every_pod_and_names_its_metrics_port() -> None:
    _check_scrape_wiring(_render(DEPLOY / "base"), set(METRICS_PORTS) - {"stt"})


@needs_kubectl
def test_the_overlays_still_render() -> None:
    for overlay in sorted((DEPLOY / "overlays").iterdir()):
        assert _render(overlay), overlay


@needs_kubectl
def test_servicemonitors_select_each_service_and_its_metrics_port(full_render: list[dict[str, Any]]) -> None:
    _check_scrape_wiring(full_render, set(METRICS_PORTS))
    services = [doc for doc in full_render if doc["kind"] == "Service"]
    monitors = {doc["metadata"]["name"]: doc for doc in full_render if doc["kind"] == "ServiceMonitor"}
    assert set(monitors) == set(METRICS_PORTS)
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "hoosh-check"
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "jobLabel", "namespaceSelector", "targetLabels"}, sorted(spec)
        selector = spec["selector"]
        assert set(selector) == {"matchLabels"}, selector
        selected = [
            svc["metadata"]["name"]
            for svc in services
            if selector["matchLabels"].items() <= svc["metadata"].get("labels", {}).items()
        ]
        assert selected == [name], f"ServiceMonitor {name} selects {selected}"
        (service,) = [svc for svc in services if svc["metadata"]["name"] == name]
        port_names = {port["name"] for port in service["spec"]["ports"]}
        assert spec["endpoints"], name
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, sorted(endpoint)
            assert endpoint["port"] in port_names and endpoint["port"] == "metrics", endpoint
            assert endpoint.get("path", "/metrics") == "/metrics"
            for duration in ("interval", "scrapeTimeout"):
                if duration in endpoint:
                    assert re.fullmatch(r"\d+(ms|s|m)", endpoint[duration]), endpoint


@needs_kubectl
def test_the_component_sends_traces_to_the_collector_and_ships_the_dashboards(
    full_render: list[dict[str, Any]],
) -> None:
    config_maps = {doc["metadata"]["name"]: doc for doc in full_render if doc["kind"] == "ConfigMap"}
    (env,) = [doc for name, doc in config_maps.items() if name.startswith("hoosh-env-")]
    assert env["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["data"]["OTEL_EXPORTER_OTLP_PROTOCOL"] in ("grpc", "http/protobuf")
    for workload in _workloads(full_render).values():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            sources = [source.get("configMapRef", {}).get("name") for source in container.get("envFrom", [])]
            assert env["metadata"]["name"] in sources, workload["metadata"]["name"]
    shipped = {}
    for doc in config_maps.values():
        if doc["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for key, text in doc["data"].items():
                shipped[key] = json.loads(text)
    assert shipped == _dashboards()


@needs_kubectl
def test_the_network_policies_let_prometheus_reach_the_metrics_ports(full_render: list[dict[str, Any]]) -> None:
    policies = [doc for doc in full_render if doc["kind"] == "NetworkPolicy"]
    allowing = [
        policy
        for policy in policies
        if policy["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/part-of": "hoosh"}
        and any(port.get("port") == "metrics" for rule in policy["spec"].get("ingress", []) for port in rule["ports"])
    ]
    assert allowing, "every hoosh pod denies ingress by default: the metrics port needs a rule"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            # A rule without ports opens every port, the metrics port included.
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports"
            if not any(port.get("port") == "metrics" for port in rule["ports"]):
                continue
            where = policy["metadata"]["name"]
            peers = rule.get("from")
            assert peers, f"{where}: the metrics ports open to every source"
            for peer in peers:
                assert set(peer) == {"namespaceSelector", "podSelector"}, f"{where}: {peer}"
                # Only Prometheus's namespace, by the label Kubernetes sets to its name (an
                # empty selector would admit a pod of that name in any namespace).
                namespaces = peer["namespaceSelector"] or {}
                assert namespaces.get("matchLabels", {}).get("kubernetes.io/metadata.name") == "monitoring", (
                    f"{where}: restrict the namespace (kubernetes.io/metadata.name: monitoring), not {namespaces}"
                )
                assert peer["podSelector"].get("matchLabels"), f"{where}: every pod of the namespace: {peer}"


@needs_kubectl
def test_the_rendered_manifests_pass_the_kubernetes_schema(full_render: list[dict[str, Any]]) -> None:
    import kubernetes_validate  # requirements-dev.txt

    for document in full_render:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked above
        if document["apiVersion"].startswith("cert-manager.io/"):
            continue  # cert-manager's (deploy/base/tls.yaml): not in the Kubernetes schemas
        kubernetes_validate.validate(document, "1.32", strict=True)
