"""The autoscaling policy, table by table: demand rules (throughput, backlog, queue, latency rules gated by
load), min/max, the P:D ratio, starting workers, scale-out at once and scale-in after the window, cooldown,
role flips, holding without data, and which worker leaves."""

from __future__ import annotations

import pytest

from pdserve.autoscale.policy import PolicyState, Signals, decide, demand
from pdserve.autoscale.removal import RemovalCandidate, pick_removal
from pdserve.config import AutoscalingConfig

CFG = AutoscalingConfig(
    decode_tokens_per_worker=100, prefill_tokens_per_worker=1000, min_prefill=1, max_prefill=4, min_decode=1,
    max_decode=6, scale_in_window_s=60, cooldown_s=10, pd_ratio_min=0.25, pd_ratio_max=2.0,
)  # fmt: skip


RATE = CFG.replace(prefill_tokens_per_s_per_worker=1000, prefill_queue_drain_s=2)


def sig(p=1, d=1, c=0, tok=50.0, queued=0.0, kv=0.3, ttft=1.0, tpot=1.0, rate=None, sp=0, sd=0) -> Signals:
    return Signals(p, d, c, decode_tokens_per_s=tok, kv_usage=kv, prefill_tokens_queued=queued,
                   ttft_attainment=ttft, tpot_attainment=tpot, prompt_tokens_per_s=rate,
                   starting_prefill=sp, starting_decode=sd)  # fmt: skip


@pytest.mark.parametrize(
    "s, want, why",
    [
        (sig(tok=50), {"prefill": 0, "decode": 1}, []),
        (sig(tok=250), {"prefill": 0, "decode": 3}, []),  # ceil(250 / 100)
        (sig(d=2, tok=50, kv=0.95), {"prefill": 0, "decode": 3}, ["kv_usage"]),  # one more than now
        (sig(d=2, tok=150, tpot=0.5), {"prefill": 0, "decode": 3}, ["tpot_attainment"]),  # loaded: 1.5 of 2
        (sig(d=2, tok=50, kv=0.1, tpot=0.5), {"prefill": 0, "decode": 1}, []),  # idle: misses are not capacity
        (sig(queued=2500), {"prefill": 3, "decode": 1}, []),  # ceil(2500 / 1000)
        (sig(p=2, queued=1500, ttft=0.5), {"prefill": 3, "decode": 1}, ["ttft_attainment"]),
        (sig(p=2, queued=0, ttft=0.5), {"prefill": 0, "decode": 1}, []),  # an idle pool's misses add nothing
        (sig(c=2, d=0, p=0, tok=50, kv=0.9), {"prefill": 0, "decode": 3}, ["kv_usage"]),  # colocated count
    ],
)
def test_demand_rules(s, want, why):
    assert demand(s, CFG) == (want, why)


@pytest.mark.parametrize(
    "s, prefill, why",
    [
        (sig(rate=2500), 3, []),  # ceil(2500 / 1000 per worker)
        (sig(rate=None, queued=2500), 3, []),  # no throughput series: the queue alone
        (sig(p=2, rate=1000, queued=3500), 1, []),  # 2 workers x 1000/s x 2 s clear 4000 queued: no more
        (sig(p=2, rate=1000, queued=8000), 3, []),  # 4000 beyond that, cleared in 2 s: +2000/s
        (sig(p=2, rate=1500, ttft=0.5), 3, ["ttft_attainment"]),  # 1.5 of 2 workers' target: loaded
        (sig(p=2, rate=500, ttft=0.5), 1, []),  # 0.5 of 2: misses are not for want of prefill workers
    ],
)
def test_prefill_demand_from_throughput(s, prefill, why):
    assert demand(s, RATE) == ({"prefill": prefill, "decode": 1}, why)


@pytest.mark.parametrize(
    "s, action, targets",
    [
        (sig(tok=50), "hold", {"prefill": 1, "decode": 1, "colocated": 0}),
        (sig(tok=450, queued=3500), "scale_out", {"prefill": 4, "decode": 5, "colocated": 0}),  # both, at once
        (sig(tok=5000), "scale_out", {"prefill": 2, "decode": 6, "colocated": 0}),  # max_decode; ratio >= 0.25
        (sig(queued=99000), "scale_out", {"prefill": 4, "decode": 2, "colocated": 0}),  # <= 2 per decode: +1 decode
        (sig(p=0, d=0, c=1, tok=450), "scale_out", {"prefill": 0, "decode": 0, "colocated": 5}),  # colocated pool
        (sig(p=0, d=0, c=2, tok=50, queued=3500), "scale_out", {"prefill": 0, "decode": 0, "colocated": 4}),
    ],
)
def test_first_decision(s, action, targets):
    d = decide(s, PolicyState(), CFG, now=1000.0)
    assert (d.action, d.targets) == (action, targets), d


def test_scale_in_waits_for_the_window_then_goes_one_at_a_time_and_never_below_min():
    state = PolicyState()
    busy, idle = sig(d=4, p=2, tok=400, queued=1500), sig(d=4, p=2, tok=0, queued=0)
    assert decide(busy, state, CFG, now=0).action == "hold"  # at target
    for t in (15, 30, 45):  # demand fell, but not for a whole window yet (and the peak is in it)
        assert decide(idle, state, CFG, now=t).action == "hold"
    d = decide(idle, state, CFG, now=61)
    assert d.action == "scale_in" and d.targets["decode"] == 3 and d.reason == "demand_fell", d
    assert decide(sig(d=3, p=2, tok=0), state, CFG, now=65).reason == "cooldown"
    sizes = {"p": 2, "d": 3}
    for t in range(75, 400, 12):
        d = decide(sig(d=sizes["d"], p=sizes["p"], tok=0, queued=0), state, CFG, now=t)
        if d.action == "scale_in":
            sizes = {"p": d.targets["prefill"], "d": d.targets["decode"]}
        assert d.action in ("scale_in", "hold"), d
    assert sizes == {"p": 1, "d": 1}  # min_prefill, min_decode


@pytest.mark.parametrize(
    "s, action, targets",
    [
        # 1 ready + 2 starting decode workers cover ceil(250 / 100): nothing more while they boot
        (sig(d=1, sd=2, tok=250), "hold", {"prefill": 1, "decode": 3, "colocated": 0}),
        (sig(d=1, sd=1, tok=250), "scale_out", {"prefill": 1, "decode": 3, "colocated": 0}),  # one more
        # low TTFT asks for one more than the 2 ready: the starting one is it
        (sig(p=2, d=2, sp=1, queued=1500, ttft=0.5), "hold", {"prefill": 3, "decode": 2, "colocated": 0}),
    ],
)
def test_starting_workers_count(s, action, targets):
    d = decide(s, PolicyState(), CFG, now=1000.0)
    assert (d.action, d.targets) == (action, targets), d


@pytest.mark.parametrize("step, decode", [(1, 4), (2, 3), (8, 2)])
def test_scale_in_goes_towards_the_window_demand_by_at_most_the_step(step, decode):
    cfg, state = CFG.replace(scale_in_max_workers=step), PolicyState()
    for t in range(0, 61, 10):  # 5 decode workers, demand 2 for a whole window
        d = decide(sig(p=1, d=5, tok=150), state, cfg, now=t)
    assert d.action == "scale_in" and d.targets["decode"] == decode, d


def test_scale_out_ignores_the_window_but_respects_the_cooldown():
    state = PolicyState()
    assert decide(sig(tok=50), state, CFG, now=0).action == "hold"
    first = decide(sig(tok=250), state, CFG, now=1)
    assert first.action == "scale_out" and first.targets["decode"] == 3
    assert decide(sig(d=3, tok=550), state, CFG, now=5).reason == "cooldown"
    assert decide(sig(d=3, tok=550), state, CFG, now=12).targets["decode"] == 6


def test_a_short_pool_takes_a_worker_from_a_pool_with_slack():
    state = PolicyState()
    for t in range(0, 70, 10):  # decode-heavy for a whole window: 3 decode, 3 prefill with little to do
        decide(sig(p=3, d=3, tok=280, queued=0), state, CFG, now=t)
    d = decide(sig(p=3, d=3, tok=390, queued=0), state, CFG, now=70)
    assert d.action == "flip" and d.flip == ("prefill", "decode"), d
    assert d.targets == {"prefill": 2, "decode": 4, "colocated": 0}
    off = AutoscalingConfig(**{**CFG.model_dump(), "flip_roles": False})
    state = PolicyState()
    for t in range(0, 70, 10):
        decide(sig(p=3, d=3, tok=280), state, off, now=t)
    assert decide(sig(p=3, d=3, tok=390), state, off, now=70).action == "scale_out"


def test_at_the_gpu_budget_a_short_pool_waits_for_a_flip():
    budget = CFG.replace(max_workers=6)
    state = PolicyState()
    out = decide(sig(p=2, d=3, tok=550), state, budget, now=0)  # decode wants 6: only one more fits
    assert out.action == "scale_out" and out.targets == {"prefill": 2, "decode": 4, "colocated": 0}, out
    state = PolicyState()
    for t in range(0, 60, 10):  # decode short at the budget; prefill's slack not yet stable for a window
        d = decide(sig(p=3, d=3, tok=390, queued=0), state, budget, now=t)
        assert (d.action, d.reason) == ("hold", "max_workers"), (t, d)
    d = decide(sig(p=3, d=3, tok=390, queued=0), state, budget, now=60)
    assert d.action == "flip" and d.targets == {"prefill": 2, "decode": 4, "colocated": 0}, d
    unbounded = PolicyState()
    assert decide(sig(p=3, d=3, tok=390, queued=0), unbounded, CFG, now=0).action == "scale_out"


@pytest.mark.parametrize("missing", ["everything", "unreachable"])
def test_no_data_holds_the_current_sizes(missing):
    state = PolicyState()
    s = Signals(3, 4, 0)  # what observe() gives when Prometheus has no series (or is down: no signals at all)
    for t in range(0, 500, 10):
        d = decide(s, state, CFG, now=t)
        assert (d.action, d.reason, d.targets) == ("hold", "no_data", {"prefill": 3, "decode": 4, "colocated": 0})


@pytest.mark.parametrize(
    "candidates, chosen",
    [
        ([RemovalCandidate("decode-1", 3, 0), RemovalCandidate("decode-2", 1, 500)], "decode-2"),  # fewest running
        ([RemovalCandidate("decode-1", 2, 40), RemovalCandidate("decode-2", 2, 10)], "decode-2"),  # least unique
        ([RemovalCandidate("decode-3", 0, 0), RemovalCandidate("decode-7", 0, 0)], "decode-7"),  # the newest
        ([], None),
    ],
)
def test_which_worker_leaves(candidates, chosen):
    assert pick_removal(candidates) == chosen


@pytest.mark.parametrize(
    "changes, s, prefill",
    [
        # the ratio would ask for 8 prefill workers (2 per decode x 4): max_prefill caps it
        ({"max_prefill": 6, "max_decode": 4, "pd_ratio_min": 2}, sig(p=2, tok=3500), 6),
        # the ratio would allow 1 per decode worker only: min_prefill keeps 3
        ({"min_prefill": 3, "pd_ratio_max": 1.0}, sig(p=3, d=2, tok=150), 3),
    ],
)
def test_min_and_max_win_over_the_ratio(changes, s, prefill):
    cfg = AutoscalingConfig(**{**CFG.model_dump(), **changes, "decode_tokens_per_worker": 1000})
    state = PolicyState()
    for t in range(0, 200, 20):
        d = decide(s, state, cfg, now=t)
        assert d.targets["prefill"] == prefill or d.action == "hold" and s.prefill == prefill, d
