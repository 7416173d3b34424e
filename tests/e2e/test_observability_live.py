"""The dashboards and the Prometheus rules against live data: a P/D deployment scraped by a real Prometheus
running deploy/prometheus.yml with its rules (1 s scrapes), a short load with a live migration and an
autoscaling action; then every dashboard query (variables substituted as Grafana would with "All") and every
recording rule returns data through Prometheus' query API, and every alert expression is valid."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from pdserve.live.inprocess import live_deployment
from pdserve.live.poll import wait
from pdserve.load.steady import uncached
from tests.conftest import needs_binary

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.e2e,
    needs_binary("prometheus", "promtool"),
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "pdserve.json"
RULES = ROOT / "deploy" / "rules" / "pdserve.rules.yml"
ALL = ".*"  # Grafana's allValue for every multi-value variable of the dashboard
RATE_INTERVAL = "5m"  # $__rate_interval: the whole run


def substitute(expr: str) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$\{?(\w+)\}?", ALL, expr)


def query(prom_url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def migrate_one_stream(url: str) -> dict:
    """Start a long stream, move it to another decode worker once it runs; its text must arrive whole."""
    body = {"model": "pdserve-demo", "prompt": "move me along " * 6, "max_tokens": 200, "ignore_eos": True,
            "stream": True, "temperature": 0}  # fmt: skip
    answer, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            tokens += 1
            if answer is None and tokens == 10:
                answer = httpx.post(f"{url}/admin/migrate", json={"request_id": chunk["id"]}, timeout=60)
    assert answer is not None and answer.status_code == 200, answer and answer.text
    return answer.json()["data"][0]


def test_every_dashboard_query_and_recording_rule_returns_live_data():
    auto = {
        "interval_s": 1.0, "decode_tokens_per_worker": 10, "min_prefill": 1, "max_prefill": 1, "min_decode": 2,
        "max_decode": 3, "scale_in_window_s": 600, "cooldown_s": 2, "ttft_slo_s": 40, "tpot_slo_s": 5,
        "flip_roles": False,
    }  # fmt: skip
    # frontends and controller pinned by a Ray resource, as the Helm chart pins them to its head pod
    with live_deployment(
        auto, "pdserve-test-observability", ray_resources={"head": 2}, engine={"num_kv_blocks": 256},
        pools={"prefill": 1, "decode": 2}, migration={"rebalance": False}, frontend={"resources": {"head": 1}},
        controller={"resources": {"head": 1}},
    ) as live:  # fmt: skip
        load = uncached(live.url, concurrency=4).start_thread()
        try:
            record = migrate_one_stream(live.url)
            assert record["outcome"] == "migrated", record
            wait(lambda: len(live.ready("decode")) == 3, 150, "the autoscaler's third decode worker")
            time.sleep(3)  # scrapes and rule evaluations of the last seconds of load
        finally:
            load.end()
        assert load.done > 0 and not load.failures, load.failures[:3]
        assert ray.available_resources().get("head", 0) == 0  # held by the controller and the frontend
        assert "scale_out" in live.actions(), live.decisions()
        prom = live.prom

        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        targets = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
        assert len(targets) >= 40, len(targets)
        for title, expr in targets:
            if not has_data(query(prom.url, substitute(expr))):
                empty.append(f"panel {title!r}: {expr}")
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"], re.S).groups()
            found = {s["metric"].get(label) for s in query(prom.url, substitute(selector))} - {None}
            if not found:
                empty.append(f"variable {var['name']!r}: {var['query']}")
        rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        records = [r["record"] for r in rules if "record" in r]
        assert len(records) >= 20, records
        for name in records:
            if not has_data(query(prom.url, name)):
                empty.append(f"recording rule {name}")
        assert not empty, "no data:\n" + "\n".join(empty)
        for alert in (r for r in rules if "alert" in r):
            query(prom.url, alert["expr"])  # evaluates (an alert that does not fire returns nothing)
        check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
        assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
