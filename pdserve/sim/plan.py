"""Layout search for `pdserve plan`: every way to split N workers (xPyD, all colocated, a few colocated + P/D
mixes) replayed through the simulator; per layout the SLO attainment at the trace's rate and the goodput found
by bisecting a rate multiplier; the ranking (highest goodput per GPU; near ties go to the simpler layout).

One worker is one GPU (tensor parallelism 1). Goodput assumes attainment falls as the rate rises (bisection).
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

from pdserve.router.policies import DisaggConfig
from pdserve.sim.cluster import ClusterConfig, Simulation
from pdserve.sim.metrics import SLO, summarize
from pdserve.sim.model import LatencyModel
from pdserve.sim.trace import TraceRequest, mean_rate

MIX_FRACTIONS = (0.25, 0.5, 0.75)  # colocated share of the GPUs in the mixed layouts


@dataclass(frozen=True)
class Layout:
    prefill: int = 0
    decode: int = 0
    colocated: int = 0

    @property
    def gpus(self) -> int:
        return self.prefill + self.decode + self.colocated

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0 and self.decode > 0

    @property
    def roles(self) -> int:
        """How many kinds of worker it runs: 1 (colocated), 2 (P/D) or 3 (a mix); fewer is simpler."""
        return sum(n > 0 for n in (self.prefill, self.decode, self.colocated))

    @property
    def pd_ratio(self) -> float | None:
        return self.prefill / self.decode if self.disaggregated else None

    @property
    def name(self) -> str:
        parts = [f"{self.colocated}C"] if self.colocated else []
        if self.prefill or self.decode:
            parts.append(f"{self.prefill}P{self.decode}D")
        return "+".join(parts)


@dataclass(frozen=True)
class PlanOptions:
    """How each layout is replayed and searched."""

    rate_scale: float = 1.0  # the table's attainment column is at the trace's rate times this
    block_size: int = 512
    policy: str = "prefix_aware"
    seed: int = 0
    tolerance: float = 0.05  # bisection stops when the rate bracket is within this ratio
    max_scale: float = 64.0  # search rates within [rate_scale / max_scale, rate_scale * max_scale]
    tie: float = 0.02  # goodputs within this fraction of the best count as tied
    disagg: DisaggConfig | None = None  # the router's local-prefill decider (None: pdserve's defaults)


@dataclass(frozen=True)
class LayoutResult:
    layout: Layout
    attainment: float  # SLO attainment at the trace's rate times `rate_scale`
    goodput_req_s: float  # highest rate found with attainment >= the SLO's target (0: none found)
    goodput_scale: float  # that rate as a multiple of the trace's own rate
    capped: bool  # still met at the top of the search range: the goodput is a lower bound
    ttft_p99: float | None  # at `rate_scale`
    tpot_p99: float | None
    rejected: int
    failed: int
    points: list[tuple[float, float]] = field(default_factory=list)  # (rate multiplier, attainment) tried

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_req_s / self.layout.gpus


def layouts(gpus: int) -> list[Layout]:
    """The pure layouts of `gpus` workers: every xPyD split (x, y >= 1), then all colocated."""
    return [Layout(prefill=p, decode=gpus - p) for p in range(1, gpus)] + [Layout(colocated=gpus)]


def mixes(gpus: int, prefill_fraction: float) -> list[Layout]:
    """A few colocated + P/D mixes: a quarter, half and three quarters colocated (at least two GPUs left for
    the split), the rest split with `prefill_fraction` of it prefilling."""
    out = []
    for frac in MIX_FRACTIONS:
        c = round(gpus * frac)
        rest = gpus - c
        if c < 1 or rest < 2:
            continue
        p = min(rest - 1, max(1, round(rest * prefill_fraction)))
        layout = Layout(prefill=p, decode=rest - p, colocated=c)
        if layout not in out:
            out.append(layout)
    return out


def scaled(trace: list[TraceRequest], x: float) -> list[TraceRequest]:
    """The trace at `x` times its rate (arrival times divided by `x`)."""
    return [replace(r, arrival_s=r.arrival_s / x) for r in trace]


def simulate(trace, model: LatencyModel, layout: Layout, slo: SLO, opts: PlanOptions, x: float) -> dict:
    cluster = ClusterConfig(
        num_prefill=layout.prefill,
        num_decode=layout.decode,
        num_colocated=layout.colocated,
        block_size=opts.block_size,
        **({"disagg": opts.disagg} if opts.disagg is not None else {}),
    )
    sim = Simulation(scaled(trace, x), model, cluster, opts.policy, seed=opts.seed)
    return summarize(sim.run(), sim.workers, slo)


def search(task: tuple) -> LayoutResult:
    """One layout: the run at `rate_scale`, then doubling or halving to bracket the goodput, then bisection
    (geometric) until the bracket is within `tolerance`."""
    trace, model, layout, slo, opts = task
    points: dict[float, float] = {}

    def meets(x: float) -> bool:
        if x not in points:
            points[x] = simulate(trace, model, layout, slo, opts, x)["slo_attainment"]
        return points[x] >= slo.target

    x0 = opts.rate_scale
    main = simulate(trace, model, layout, slo, opts, x0)
    points[x0] = main["slo_attainment"]
    lo = hi = None
    top, bottom = x0 * opts.max_scale, x0 / opts.max_scale
    if meets(x0):
        lo, x = x0, x0 * 2
        while hi is None and x <= top * (1 + 1e-9):
            lo, hi = (x, None) if meets(x) else (lo, x)
            x *= 2
    else:
        hi, x = x0, x0 / 2
        while lo is None and x >= bottom * (1 - 1e-9):
            lo, hi = (x, hi) if meets(x) else (None, x)
            x /= 2
    if lo is not None and hi is not None:
        while hi / lo > 1 + opts.tolerance:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    rate = mean_rate(trace)
    return LayoutResult(
        layout=layout,
        attainment=main["slo_attainment"],
        goodput_req_s=(lo or 0.0) * rate,
        goodput_scale=lo or 0.0,
        capped=lo is not None and hi is None,
        ttft_p99=main["ttft_p99"],
        tpot_p99=main["tpot_p99"],
        rejected=main["rejected"],
        failed=main["failed"],
        points=sorted(points.items()),
    )


def rank(results: list[LayoutResult], tie: float = 0.02) -> list[LayoutResult]:
    """Best first: the simplest layout (fewest roles) among those within `tie` of the highest goodput per GPU;
    the rest by goodput per GPU, then simplicity."""
    if not results:
        return []
    top = max(r.goodput_per_gpu for r in results)
    near = [r for r in results if r.goodput_per_gpu >= top * (1 - tie)]
    best = min(near, key=lambda r: (r.layout.roles, -r.goodput_per_gpu, -r.attainment))
    rest = sorted((r for r in results if r is not best), key=lambda r: (-r.goodput_per_gpu, r.layout.roles))
    return [best, *rest]


def plan(
    trace: list[TraceRequest],
    gpus: int,
    slo: SLO,
    model: LatencyModel,
    options: PlanOptions | None = None,
    *,
    jobs: int = 1,
    candidates: list[Layout] | None = None,
) -> list[LayoutResult]:
    """Search the layouts of `gpus` workers for `trace` (arrival-ordered) under `slo`; best first (see `rank`).

    `candidates` replaces the default set (the pure layouts, then mixes split like the best xPyD); `jobs`
    processes search layouts in parallel (1: in this process)."""
    opts = options or PlanOptions()
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if len(trace) < 2 or not math.isfinite(mean_rate(trace)):
        raise ValueError("the trace needs at least two requests arriving at different times (for a rate)")
    pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
    run = pool.map if pool else map
    try:

        def search_all(group: list[Layout]) -> list[LayoutResult]:
            return list(run(search, [(trace, model, layout, slo, opts) for layout in group]))

        if candidates is not None:
            return rank(search_all(candidates), opts.tie)
        results = search_all(layouts(gpus))
        splits = [r for r in results if r.layout.disaggregated]
        if splits:
            best = max(splits, key=lambda r: (r.goodput_per_gpu, -abs(r.layout.prefill - r.layout.decode)))
            fraction = best.layout.prefill / gpus if best.goodput_req_s > 0 else 0.5
            results += search_all(mixes(gpus, fraction))
        return rank(results, opts.tie)
    finally:
        if pool:
            pool.shutdown()
