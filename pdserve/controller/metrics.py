"""The controller's Prometheus series: per-worker load and prefix-cache counters, pool sizes, routing
decisions. They are exported once, here, from what the workers' heartbeats already carry, so a scrape
makes no call to any worker and every series appears once however many frontends run."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdserve.config import ROLES
from pdserve.controller.registry import STATES, Registry


class _RegistryCollector:
    """Series read from the registry at scrape time (last heartbeat of each live worker)."""

    def __init__(self, registry: Callable[[], Registry]) -> None:
        self._registry = registry

    def collect(self):
        reg = self._registry()
        labels = ["worker", "role"]
        running = GaugeMetricFamily("pdserve_worker_running_requests", "Requests running on a worker", labels=labels)
        waiting = GaugeMetricFamily("pdserve_worker_waiting_requests", "Requests queued on a worker", labels=labels)
        usage = GaugeMetricFamily(
            "pdserve_worker_kv_usage_ratio", "Fraction of a worker's KV blocks in use (0..1)", labels=labels
        )
        queued = GaugeMetricFamily(
            "pdserve_worker_prefill_tokens_queued",
            "Prompt tokens admitted on a worker, not yet computed",
            labels=labels,
        )
        prompt = CounterMetricFamily(
            "pdserve_prefix_cache_prompt_tokens",
            "Prompt tokens by the worker that prefilled them (denominator of its prefix hit rate)",
            labels=["worker"],
        )
        generated = CounterMetricFamily(
            "pdserve_worker_generated_tokens",
            "Tokens sampled on a worker (its decode throughput, as a rate)",
            labels=labels,
        )
        refused = CounterMetricFamily(
            "pdserve_worker_admission_refusals",
            "Requests a worker refused at its admission bound (engine.max_num_seqs running plus "
            "routing.max_waiting_per_worker queued); each was routed elsewhere or answered 429",
            labels=labels,
        )
        hit = CounterMetricFamily(
            "pdserve_prefix_cache_hit_tokens",
            "Prompt tokens served from that worker's prefix cache (numerator of its prefix hit rate)",
            labels=["worker"],
        )
        pools = GaugeMetricFamily("pdserve_workers", "Workers by role and state", labels=["role", "state"])
        target = GaugeMetricFamily("pdserve_workers_target", "Target pool size by role", labels=["role"])
        counts = {(role, state): 0 for role in ROLES for state in STATES}
        for rec in reg.workers.values():
            counts[(rec.role, rec.state)] += 1
            s = rec.stats
            if s is None or rec.state == "dead":
                continue
            running.add_metric([rec.worker_id, rec.role], s.num_running)
            waiting.add_metric([rec.worker_id, rec.role], s.num_waiting)
            usage.add_metric([rec.worker_id, rec.role], s.kv_usage)
            queued.add_metric([rec.worker_id, rec.role], s.num_prefill_tokens_queued)
            prompt.add_metric([rec.worker_id], s.prefix_prompt_tokens_total)
            hit.add_metric([rec.worker_id], s.prefix_hit_tokens_total)
            generated.add_metric([rec.worker_id, rec.role], s.num_generated_tokens_total)
            refused.add_metric([rec.worker_id, rec.role], s.num_refused_total)
        for (role, state), n in counts.items():
            pools.add_metric([role, state], n)
        for role, n in reg.targets.items():
            target.add_metric([role], n)
        yield from (running, waiting, usage, queued, prompt, hit, generated, refused, pools, target)


class ControllerMetrics:
    def __init__(self, registry: Callable[[], Registry]) -> None:
        self.registry = r = CollectorRegistry()
        r.register(_RegistryCollector(registry))
        self.routing_decisions = Counter(
            "pdserve_routing_decisions_total",
            "Routing decisions by policy and the policy's reason (prefix_hit, load, imbalanced, ...)",
            ["policy", "reason"],
            registry=r,
        )
        self.disagg_decisions = Counter(
            "pdserve_disaggregation_decisions_total",
            "Where prompts were prefilled: disaggregated, or locally on the decode worker and why",
            ["decision"],
            registry=r,
        )
        self.router_decision_seconds = Histogram(
            "pdserve_router_decision_seconds",
            "Time the global router spent on one routing decision",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
            registry=r,
        )
        self.worker_deaths = Counter(
            "pdserve_worker_deaths_total",
            "Workers found dead, by role and cause (actor_died, heartbeat_timeout, start_failed)",
            ["role", "cause"],
            registry=r,
        )
        for role in ROLES:  # zeros, not absent series: a panel or alert on deaths has data before the first
            for cause in ("actor_died", "heartbeat_timeout", "start_failed"):
                self.worker_deaths.labels(role, cause)

        self.migrations = Counter(
            "pdserve_migrations_total",
            "Live migrations by reason (operator, rebalance, drain, out_of_blocks) and outcome",
            ["reason", "outcome"],
            registry=r,
        )
        self.migration_stages = Histogram(
            "pdserve_migration_stages",
            "Copy stages per completed migration, the final (paused) one included",
            buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16),
            registry=r,
        )
        self.migration_bytes = Counter(
            "pdserve_migration_bytes_total", "KV bytes copied by completed migrations", registry=r
        )
        self.migration_pause = Histogram(
            "pdserve_migration_pause_seconds",
            "From the source pausing a migrating request to the target's first token",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.migration_seconds = Histogram(
            "pdserve_migration_seconds",
            "From the first stage to the target's confirmation, per completed migration",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )

        self.autoscaler_desired = Gauge(
            "pdserve_autoscaler_desired_workers",
            "Workers each pool needs by the autoscaler's last observation (its demand, before hysteresis)",
            ["role"],
            registry=r,
        )
        self.autoscaler_decisions = Counter(
            "pdserve_autoscaler_decisions_total",
            "Autoscaler decisions by action (hold, scale_out, scale_in, flip; failed: an action that raised or"
            " did not settle in time) and reason",
            ["action", "reason"],
            registry=r,
        )

    def serve(self, port: int) -> int:
        """Serve /metrics on `port` (0: a free one) in a background thread; returns the port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, registry=self.registry)
        return server.server_address[1]
