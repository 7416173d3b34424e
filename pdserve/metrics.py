"""Every Prometheus metric pdserve exports; the names are the contract for dashboards and the autoscaler.

One `Metrics` object owns one `CollectorRegistry`, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. Fine at the low end for GPU decode steps (ms), wide enough for CPU tests and long generations.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
    120.0, 240.0, 480.0, 960.0,
)  # fmt: skip
# A KV handoff moves MBs to GBs: sub-ms over NVLink/RDMA, seconds over a slow TCP fallback.
KV_TRANSFER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

WORKER_LABELS = ("worker", "role")


class Metrics:
    """A frontend's metric objects (one registry). Request metrics are observed by the API server, the TTFT
    decomposition, KV-transfer and retry metrics by the cluster client (each value in one histogram),
    and an in-process engine's gauges from `LocalClient.stats()`. A deployment's per-worker and routing
    series are the controller's (`pdserve/controller/metrics.py`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()

        # ---- requests at the API (one observation per HTTP request unless stated) --------------------
        self.requests = Counter(
            "pdserve_requests_total",
            "HTTP requests by endpoint and status code (499: client went away before the response finished)",
            ["endpoint", "status"],
            registry=r,
        )
        self.requests_finished = Counter(
            "pdserve_request_finished_total",
            "Generated sequences (choices) by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("pdserve_request_prompt_tokens_total", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("pdserve_request_generation_tokens_total", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "pdserve_prompt_cached_tokens_total", "Prompt tokens served from a prefix cache", registry=r
        )
        self.num_requests_running = Gauge(
            "pdserve_num_requests_running", "Requests in flight at the API server", registry=r
        )
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds",
            "Request arrival to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between consecutive generated tokens of one sequence",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds",
            "Request arrival to its last token",
            buckets=E2E_BUCKETS,
            registry=r,
        )

        # ---- TTFT decomposition and KV handoff (observed by the cluster client) ------------------
        self.ttft_queue = Histogram(
            "pdserve_ttft_queue_seconds",
            "Arrival until a prefill worker starts the request (routing and queueing)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.ttft_prefill = Histogram(
            "pdserve_ttft_prefill_seconds",
            "Prefill compute until the first token is sampled",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.kv_transfer_bytes = Counter(
            "pdserve_kv_transfer_bytes_total", "KV cache bytes moved between workers", registry=r
        )
        self.kv_transfer_seconds = Histogram(
            "pdserve_kv_transfer_seconds",
            "Duration of one KV handoff (reserve to confirmed)",
            buckets=KV_TRANSFER_BUCKETS,
            registry=r,
        )

        self.request_retries = Counter(
            "pdserve_request_retries_total",
            "Requests routed again after a worker died: before_first_token (re-routed) or mid_stream "
            "(continued on another worker by recompute)",
            ["cause"],
            registry=r,
        )
        for cause in ("before_first_token", "mid_stream"):  # zeros before the first retry
            self.request_retries.labels(cause)
        self.admission_refusals = Counter(
            "pdserve_request_admission_refusals_total",
            "Times a worker refused a request this frontend routed to it (at its admission bound), each followed "
            "by another route or a 429; by worker in the controller's pdserve_worker_admission_refusals_total",
            registry=r,
        )

        # ---- per-worker gauges of an in-process engine (LocalClient.stats()); a deployment's per-worker
        # series come from its controller instead, once however many frontends run --------------------------------
        self.worker_running = Gauge(
            "pdserve_worker_running_requests", "Requests running on a worker", WORKER_LABELS, registry=r
        )
        self.worker_waiting = Gauge(
            "pdserve_worker_waiting_requests", "Requests queued on a worker", WORKER_LABELS, registry=r
        )
        self.worker_kv_usage = Gauge(
            "pdserve_worker_kv_usage_ratio", "Fraction of a worker's KV blocks in use (0..1)", WORKER_LABELS, registry=r
        )

    def set_worker_stats(self, stats: dict) -> None:
        """Replace the worker gauges with `stats["workers"]`: a list of dicts with keys worker, role,
        running, waiting, kv_usage (the shape every engine client's `stats()` returns). Workers absent from
        `stats` disappear from the export (scaled down or dead)."""
        gauges = [(self.worker_running, "running"), (self.worker_waiting, "waiting")]
        gauges.append((self.worker_kv_usage, "kv_usage"))
        for gauge, _ in gauges:
            gauge.clear()
        for w in stats.get("workers", []):
            labels = (str(w.get("worker", "?")), str(w.get("role", "?")))
            for gauge, key in gauges:
                if key in w:
                    gauge.labels(*labels).set(w[key])

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
