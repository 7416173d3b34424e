"""Observe: the autoscaler's signals, read only through Prometheus' HTTP query API (PromQL over the recording
rules in deploy/rules/pdserve.rules.yml). Unreachable or empty answers come back as missing signals, which
the policy turns into "hold"; nothing here guesses a value."""

from __future__ import annotations

import logging

import httpx

from pdserve.autoscale.policy import Signals
from pdserve.config import AutoscalingConfig

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
# The recording rules the signals come from (deploy/rules/pdserve.rules.yml, group pdserve.autoscaling).
DECODE_TOKENS = "sum(pdserve:decode_tokens:rate1m)"
KV_USAGE = "avg(pdserve:decode_kv_usage:avg)"
PREFILL_QUEUED = "sum(pdserve:prefill_tokens_queued:sum)"
PROMPT_TOKENS = "sum(pdserve:prefill_prompt_tokens:rate1m)"
REQUEST_RATE = "sum(pdserve:requests:rate1m)"
TTFT_BUCKETS = "pdserve:ttft_seconds_bucket:rate1m"
ITL_BUCKETS = "pdserve:itl_seconds_bucket:rate1m"


def attainment_query(buckets: str, slo_s: float, bounds: tuple[float, ...]) -> str:
    """Share of observations at or under `slo_s`, from a recorded bucket-rate series: the largest bucket
    bound not above the SLO over the +Inf bucket (a bound between buckets rounds the SLO down)."""
    le = max((b for b in bounds if b <= slo_s), default=bounds[0])
    return f'sum({buckets}{{le="{le}"}}) / sum({buckets}{{le="+Inf"}})'


class PrometheusObserver:
    def __init__(self, url: str, config: AutoscalingConfig) -> None:
        from pdserve.metrics import ITL_BUCKETS as ITL
        from pdserve.metrics import TTFT_BUCKETS as TTFT

        self.url = url.rstrip("/")
        self.config = config
        self.queries = {
            "decode_tokens_per_s": DECODE_TOKENS,
            "kv_usage": KV_USAGE,
            "prefill_tokens_queued": PREFILL_QUEUED,
            "prompt_tokens_per_s": PROMPT_TOKENS,
            "request_rate": REQUEST_RATE,
            "ttft_attainment": attainment_query(TTFT_BUCKETS, config.ttft_slo_s, TTFT),
            "tpot_attainment": attainment_query(ITL_BUCKETS, config.tpot_slo_s, ITL),  # per token: ITL
        }
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S)
        self.last_error: str | None = None

    async def query(self, expr: str) -> float | None:
        """One instant query's scalar value; None for no data (or NaN: no traffic in the window)."""
        r = await self.client.get(f"{self.url}/api/v1/query", params={"query": expr})
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {expr!r}: {body.get('error')}")
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value

    async def observe(self, sizes: dict[str, int], starting: dict[str, int] | None = None) -> Signals:
        """Signals now, for `sizes` ready and `starting` started-not-yet-ready workers per role; a failed or
        empty query leaves its signal None (and a failure is remembered)."""
        values: dict[str, float | None] = {}
        self.last_error = None
        for name, expr in self.queries.items():
            try:
                values[name] = await self.query(expr)
            except Exception as e:  # unreachable, timeout, bad answer: no signal, never a guess
                values[name] = None
                self.last_error = f"{type(e).__name__}: {e}"
        if self.last_error:
            log.warning("Prometheus at %s: %s; holding what cannot be observed", self.url, self.last_error)
        starting = starting or {}
        return Signals(
            sizes.get("prefill", 0), sizes.get("decode", 0), sizes.get("colocated", 0), **values,
            starting_prefill=starting.get("prefill", 0), starting_decode=starting.get("decode", 0),
            starting_colocated=starting.get("colocated", 0),
        )  # fmt: skip

    async def close(self) -> None:
        await self.client.aclose()
