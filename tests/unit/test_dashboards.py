"""The Grafana dashboard and the Prometheus config and rules use only series and labels that
`pdserve.metrics.Metrics` exports (the names are the contract), and the files parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from pdserve.controller.metrics import ControllerMetrics
from pdserve.controller.registry import Registry, WorkerRecord
from pdserve.metrics import Metrics
from pdserve.protocol import WorkerStats

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "pdserve.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
RULES = ROOT / "deploy" / "rules" / "pdserve.rules.yml"
RULES_TESTS = ROOT / "deploy" / "rules" / "pdserve.rules.test.yml"  # run by `promtool test rules`

TARGET_LABELS = {"job", "instance", "deployment"}  # attached by Prometheus (deployment: by the scrape config)
BUILTIN_SERIES = {"up"}  # written by Prometheus for every target
# The dashboard must show these. A fixed list, so a metric added to pdserve/metrics.py fails nothing here
# before it gets a panel.
SHOWN = (
    "pdserve_requests_total",
    "pdserve_request_finished_total",
    "pdserve_request_prompt_tokens_total",
    "pdserve_request_generation_tokens_total",
    "pdserve_prompt_cached_tokens_total",
    "pdserve_num_requests_running",
    "pdserve_time_to_first_token_seconds",
    "pdserve_inter_token_latency_seconds",
    "pdserve_e2e_request_latency_seconds",
    "pdserve_ttft_queue_seconds",
    "pdserve_ttft_prefill_seconds",
    "pdserve_kv_transfer_bytes_total",
    "pdserve_kv_transfer_seconds",
    "pdserve_worker_running_requests",
    "pdserve_worker_waiting_requests",
    "pdserve_worker_kv_usage_ratio",
    "pdserve_routing_decisions_total",
    "pdserve_disaggregation_decisions_total",
    "pdserve_router_decision_seconds",
    "pdserve_prefix_cache_prompt_tokens_total",
    "pdserve_prefix_cache_hit_tokens_total",
    "pdserve_workers",
    "pdserve_workers_target",
    "pdserve_worker_deaths_total",
    "pdserve_request_retries_total",
    "pdserve_worker_prefill_tokens_queued",
    "pdserve_migrations_total",
    "pdserve_migration_pause_seconds",
    "pdserve_migration_seconds",
    "pdserve_migration_stages",
    "pdserve_migration_bytes_total",
    "pdserve_autoscaler_desired_workers",
    "pdserve_autoscaler_decisions_total",
    "pdserve_worker_generated_tokens_total",
)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\s*(\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.S)
_VARIABLE = re.compile(r"\$\{?(\w+)")


def parse(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(series names, label names in matchers, label names in by/on/... clauses) of a PromQL expression.
    Enough PromQL for our files: strings, matchers and ranges are cut out before names are read."""
    text = _STRING.sub('""', expr)  # a regex in a matcher may hold braces or parentheses
    matcher_labels = {label for body in _MATCHERS.findall(text) for label in _MATCHER_LABEL.findall(body)}
    text = _RANGE.sub(" ", _MATCHERS.sub(" ", text))
    grouping = {label for body in _GROUPING.findall(text) for label in re.findall(r"[a-zA-Z_]\w*", body)}
    text = _GROUPING.sub(" ", text)
    names = {m[1] for m in _IDENT.finditer(text) if not m[2] and m[1] not in KEYWORDS}
    return names, matcher_labels, grouping


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """Sample names and label names a scrape shows once every labelled metric has a child."""
    registry = Registry({"prefill": 1, "decode": 1})
    registry.add(WorkerRecord("p0", "prefill", state="ready", stats=WorkerStats(
        worker_id="p0", role="prefill", num_running=0, num_waiting=0, num_held=0, num_free_blocks=1, num_blocks=1,
        kv_usage=0.0, num_prefill_tokens_queued=0, time=0.0,
    )))  # fmt: skip
    names, labels = set(), set(TARGET_LABELS)
    for metrics in (Metrics(), ControllerMetrics(lambda: registry)):  # a frontend's and the controller's
        for metric in vars(metrics).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                metric.labels(*["x"] * len(metric._labelnames))
        for family in metrics.registry.collect():
            for sample in family.samples:
                names.add(sample.name)
                labels.update(sample.labels)
    return names, labels


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert groups and all(g["rules"] for g in groups)
    return [rule for g in groups for rule in g["rules"]]


def recorded(rules: list[dict]) -> set[str]:
    return {r["record"] for r in rules if "record" in r}


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (`label_values(expr, label)`)."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = _LABEL_VALUES.match(query)
            assert m, f"variable {v['name']}: expected label_values(expr, label), got {query!r}"
            out.append((f"variable {v['name']}", f"{m[1]} by ({m[2]})"))
    return out


def check_expr(where: str, expr: str, exported: tuple[set[str], set[str]], records: set[str]) -> None:
    names, labels = exported
    series, matcher_labels, grouping = parse(expr)
    assert series, f"{where}: no series in {expr!r}"
    unknown = series - names - records - BUILTIN_SERIES
    assert not unknown, f"{where}: {sorted(unknown)} neither exported by Metrics nor recorded"
    bad_labels = (matcher_labels | grouping) - labels - {"le"}
    assert not bad_labels, f"{where}: unknown labels {sorted(bad_labels)}"
    if "histogram_quantile" in expr:
        assert all(s.endswith("_bucket") for s in series if s in names), f"{where}: quantile of a non-bucket"
        assert "le" in grouping, f"{where}: histogram_quantile must keep `le`"


def test_parse_reads_names_not_labels_or_functions():
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~"$y", z!="{}"}[$__rate_interval]))) / on (job) b'
    assert parse(expr) == ({"a_bucket", "b"}, {"x", "z"}, {"le", "job"})


def test_dashboard_uses_only_exported_metrics(dashboard, exported, rules):
    queries = dashboard_queries(dashboard)
    assert len(queries) > 20
    for where, expr in queries:
        check_expr(where, expr, exported, recorded(rules))


def test_dashboard_shows_the_serving_metrics(dashboard):
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for _, expr in dashboard_queries(dashboard) for n in parse(expr)[0]}
    assert not set(SHOWN) - used, f"no panel for {sorted(set(SHOWN) - used)}"


def test_dashboard_shape(dashboard):
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "pdserve"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"worker", "role"} <= variables.keys()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x0, y0, x1, y1, other in boxes:
            overlap = g["x"] < x1 and x0 < g["x"] + g["w"] and g["y"] < y1 and y0 < g["y"] + g["h"]
            assert not overlap, f"{p['title']!r} overlaps {other!r}"
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], p["title"]))
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            refs = set(_VARIABLE.findall(t["expr"])) - {"__rate_interval"}
            assert refs <= variables.keys(), f"{p['title']!r}: undefined variables {refs - variables.keys()}"
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            assert legend <= parse(t["expr"])[2], f"{p['title']!r}: legend {legend} not kept by the query"


def test_rules_use_only_exported_metrics(rules, exported):
    records = recorded(rules)
    for rule in rules:
        assert ("record" in rule) != ("alert" in rule), rule
        where = rule.get("record") or rule["alert"]
        check_expr(where, rule["expr"], exported, records)
        if "record" in rule:
            assert re.fullmatch(r"pdserve:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), where
        else:
            assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"], where
            assert re.fullmatch(r"\d+[smh]", rule["for"]), where
    assert {
        "pdserve:ttft_seconds:p90_5m",
        "pdserve:prefix_hit_ratio:5m",
        "pdserve:prefix_hit_ratio_by_worker:5m",
    } <= records
    promtool_tests = yaml.safe_load(RULES_TESTS.read_text())
    assert promtool_tests["rule_files"] == [RULES.name]
    tested = {case["alertname"] for t in promtool_tests["tests"] for case in t["alert_rule_test"]}
    assert tested == {r["alert"] for r in rules if "alert" in r}


def test_prometheus_config(rules):
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdserve"]
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000", "127.0.0.1:9400"]  # a frontend, the controller
    matched = {p for pattern in config["rule_files"] for p in PROMETHEUS.parent.glob(pattern)}
    assert RULES in matched  # rule_files are relative to the config file
    # The alerts' target selector matches the scrape job.
    assert any('job="pdserve"' in r["expr"] for r in rules if "alert" in r)


def test_local_prometheus_runs_the_shipped_config():
    from pdserve.autoscale.local_prometheus import prometheus_config

    shipped = yaml.safe_load(PROMETHEUS.read_text())
    local = prometheus_config(["127.0.0.1:18000", "127.0.0.1:19400"], interval_s=1)
    (job,) = local["scrape_configs"]
    assert job["job_name"] == "pdserve" and job["metrics_path"] == shipped["scrape_configs"][0]["metrics_path"]
    assert job["static_configs"] == [
        {"targets": ["127.0.0.1:18000", "127.0.0.1:19400"], "labels": {"deployment": "pdserve"}}
    ]
    assert job["scrape_interval"] == local["global"]["evaluation_interval"] == "1s" and job["scrape_timeout"] == "1s"
    assert local["rule_files"] == ["pdserve.rules.yml"]
