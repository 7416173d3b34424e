"""The autoscaler's view of a simulated cluster, as Prometheus recording rules would compute it each tick:
rates and SLO attainment over the last `window_s`, gauges as they are now; plus one row per tick for plots.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

from pdserve.autoscale.policy import Signals
from pdserve.sim.metrics import SLO, meets, tpot, ttft
from pdserve.sim.worker import SimRequest, SimWorker


class Observer:
    def __init__(self, slo: SLO, window_s: float = 30.0) -> None:
        self.slo, self.window_s = slo, window_s
        self._ttft: deque[tuple[float, bool]] = deque()  # (first token time, met the TTFT SLO)
        self._prompt: deque[tuple[float, int]] = deque()  # (first token time, prompt tokens): prefill throughput
        self._tpot: deque[tuple[float, bool]] = deque()  # (finish time, met the TPOT SLO)
        self._settled: deque[tuple[float, bool]] = deque()  # (resolution time, met both), rejections included
        self._tokens: deque[tuple[float, int]] = deque([(0.0, 0)])  # (tick, decode tokens so far)
        self._busy: dict[str, float] = {}  # worker -> busy seconds at the last tick
        self._arrivals: list[float] | None = None
        self.signals: Signals | None = None
        self.prefill_busy: float | None = None  # mean busy fraction of ready prefill workers, last interval
        self.series: list[dict] = []
        self._last = 0.0

    # ---- events (histograms' observations) -------------------------------------------------------
    def first_token(self, req: SimRequest, now: float) -> None:
        self._ttft.append((now, ttft(req) <= self.slo.ttft_s))
        self._prompt.append((now, req.trace.num_prompt_tokens))

    def settled(self, req: SimRequest, now: float) -> None:
        self._settled.append((now, meets(req, self.slo)))
        if req.outcome == "finished" and (t := tpot(req)) is not None:
            self._tpot.append((now, t <= self.slo.tpot_s))

    # ---- one tick --------------------------------------------------------------------------------
    def observe(self, sim, now: float) -> Signals:
        start = now - self.window_s
        for q in (self._ttft, self._tpot, self._settled, self._prompt):
            while q and q[0][0] < start:
                q.popleft()
        span = min(self.window_s, now) or 1.0
        tokens = sum(w.decode_tokens for w in sim.workers.values())
        self._tokens.append((now, tokens))
        while len(self._tokens) > 2 and self._tokens[1][0] <= start:
            self._tokens.popleft()
        t0, n0 = self._tokens[0]
        decoders = sim.members("decode", "colocated")
        prefillers = sim.members("prefill", "colocated")
        if self._arrivals is None:
            self._arrivals = [r.trace.arrival_s for r in sim.requests]
        arrived = bisect_left(self._arrivals, now)
        self.signals = s = Signals(
            prefill=sim.count("prefill"),
            decode=sim.count("decode"),
            colocated=sim.count("colocated"),
            decode_tokens_per_s=(tokens - n0) / max(now - t0, 1e-9),
            kv_usage=sum(_kv(w) for w in decoders) / len(decoders) if decoders else None,
            prefill_tokens_queued=float(sum(w.stats(now).num_prefill_tokens_queued for w in prefillers)),
            ttft_attainment=_share(self._ttft),
            tpot_attainment=_share(self._tpot),
            request_rate=(arrived - bisect_left(self._arrivals, start)) / span,
            prompt_tokens_per_s=sum(n for _, n in self._prompt) / span,
            starting_prefill=sim.count("prefill", "starting"),
            starting_decode=sim.count("decode", "starting"),
            starting_colocated=sim.count("colocated", "starting"),
        )
        interval = now - self._last
        busy = {w.worker_id: _busy(w, now) for w in sim.members("prefill")}
        fractions = [(b - self._busy.get(wid, b)) / interval for wid, b in busy.items() if wid in self._busy]
        self.prefill_busy = sum(fractions) / len(fractions) if fractions else None
        self._busy, self._last = busy, now
        self.series.append(
            {
                "t": now,
                "arrivals_per_s": (arrived - bisect_left(self._arrivals, now - interval)) / interval,
                **{r: sim.count(r, "ready") for r in ("prefill", "decode", "colocated")},
                "starting": sum(1 for st in sim.state.values() if st == "starting"),
                "draining": sum(1 for st in sim.state.values() if st == "draining"),
                "gpus": sim.gpus,
                "attainment": _share(self._settled),
                "ttft_attainment": s.ttft_attainment,
                "tpot_attainment": s.tpot_attainment,
                "decode_tokens_per_s": s.decode_tokens_per_s,
                "kv_usage": s.kv_usage,
                "prefill_tokens_queued": s.prefill_tokens_queued,
                "prompt_tokens_per_s": s.prompt_tokens_per_s,
                "prefill_busy": self.prefill_busy,
            }
        )
        return s


def _share(q: deque[tuple[float, bool]]) -> float | None:
    return sum(ok for _, ok in q) / len(q) if q else None


def _kv(w: SimWorker) -> float:
    return 1.0 - w.cache.num_free / w.cache.num_blocks


def _busy(w: SimWorker, now: float) -> float:
    """Busy seconds so far, counting the step in flight up to `now`."""
    return w.busy_s + (max(0.0, now - w.plan.start) if w.plan else 0.0)
