"""Routing policies, the disaggregation decider and the Router (no Ray): table tests and behaviour."""

import random
import time

import pytest

from pdserve.hashing import block_hashes, root_hash
from pdserve.policy_options import PrefixAwareOptions
from pdserve.protocol import BlockStored, KVEventBatch, RouteRequest, WorkerStats
from pdserve.router.policies import (
    POLICIES,
    Candidate,
    DisaggConfig,
    DynamoKVCost,
    LeastLoaded,
    PrefixAware,
    RoundRobin,
    SGLangCacheAware,
    WorkerView,
    decide_local_prefill,
    make_policy,
)
from pdserve.router.router import NoCapacity, Router, RouterConfig

REQ = RouteRequest(request_id="r", num_prompt_tokens=1000, max_tokens=10)


def cand(wid, cached=0, role="decode", **kw):
    kw.setdefault("num_blocks", 1000)
    kw.setdefault("num_free_blocks", 1000)
    return Candidate(WorkerView(wid, role, **kw), cached)


# ---- policies as tables ---------------------------------------------------------------------------
CASES = [
    # (policy, pool, candidates, expected)
    (LeastLoaded(), "decode", [cand("a", num_running=3), cand("b", num_running=1)], "b"),
    (LeastLoaded(), "decode", [cand("a", num_running=1, pending_requests=2), cand("b", num_running=2)], "b"),
    (LeastLoaded(), "decode", [cand("a", num_running=1, kv_usage=0.9), cand("b", num_running=1, kv_usage=0.1)], "b"),
    (LeastLoaded(), "decode", [cand("a"), cand("b")], "a"),  # ties break by id
    (LeastLoaded(), "prefill", [cand("a", num_prefill_tokens_queued=500), cand("b", num_running=5)], "b"),
    (LeastLoaded(), "prefill", [cand("a", 900), cand("b", pending_tokens=100)], "a"),  # blind to prefixes
    (PrefixAware(), "prefill", [cand("a"), cand("b", cached=800)], "b"),  # 200 uncached < 1000
    (PrefixAware(), "prefill", [cand("a", num_prefill_tokens_queued=100), cand("b", 800, pending_tokens=900)], "a"),
    (PrefixAware(), "prefill", [cand("a", 800, num_waiting=30), cand("b", 0)], "b"),  # queue overhead 30*32
    (PrefixAware(), "decode", [cand("a", num_running=8), cand("b", num_running=2)], "b"),
    (PrefixAware(), "decode", [cand("a", num_running=2, num_free_blocks=100), cand("b", num_running=2)], "b"),
    (PrefixAware(), "decode", [cand("a", num_running=2), cand("b", 960, num_running=3)], "b"),  # prefix outweighs
    # local prefills already queued on a decode worker count against it; on a colocated worker, a quarter
    (PrefixAware(), "decode", [cand("a", num_prefill_tokens_queued=3000), cand("b", num_running=5)], "b"),
    (
        PrefixAware(),
        "decode",
        [cand("a", role="colocated", num_prefill_tokens_queued=1000), cand("b", num_running=5)],
        "a",
    ),
    (
        PrefixAware(),
        "decode",
        [cand("a", role="colocated", num_prefill_tokens_queued=2000), cand("b", num_running=5)],
        "b",
    ),
    # equal costs: the worker with fewer cached blocks, so an idle pool spreads its caches
    (PrefixAware(), "prefill", [cand("a", num_cached_blocks=40), cand("b", num_cached_blocks=3)], "b"),
    (SGLangCacheAware(), "prefill", [cand("a", 400), cand("b", 100)], "a"),  # ratio 0.4 > 0.3
    (SGLangCacheAware(), "prefill", [cand("a", 200, num_cached_blocks=50), cand("b", 0, num_cached_blocks=9)], "b"),
    (SGLangCacheAware(), "prefill", [cand("a", 900, num_running=200), cand("b", 0, num_running=10)], "b"),
    (SGLangCacheAware(), "prefill", [cand("a", 900, num_running=70), cand("b", 0, num_running=50)], "a"),  # < 1.5x
    (DynamoKVCost(block_size=16), "prefill", [cand("a", 800), cand("b")], "a"),
    (DynamoKVCost(block_size=16), "prefill", [cand("a", 800, num_free_blocks=900), cand("b")], "b"),  # 100 active
    (DynamoKVCost(block_size=16), "decode", [cand("a", num_prefill_tokens_queued=320), cand("b", 0)], "b"),
]


@pytest.mark.parametrize("policy,pool,candidates,expected", CASES)
def test_policy_table(policy, pool, candidates, expected):
    assert policy.pick(candidates, REQ, pool).worker_id == expected


def test_round_robin_cycles_per_pool():
    rr = RoundRobin()
    cands = [cand("b"), cand("a"), cand("c")]
    assert [rr.pick(cands, REQ, "decode").worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick(cands, REQ, "prefill").worker_id == "a"


def test_softmax_temperature_spreads_near_ties_only():
    p = PrefixAware(PrefixAwareOptions(temperature=50.0, seed=1))
    near = [cand("a", 0), cand("b", 0, num_prefill_tokens_queued=10)]
    picks = {p.pick(near, REQ, "prefill").worker_id for _ in range(50)}
    assert picks == {"a", "b"}
    far = [cand("a", 0), cand("b", 0, num_prefill_tokens_queued=2000)]
    assert {p.pick(far, REQ, "prefill").worker_id for _ in range(50)} == {"a"}


def test_every_policy_is_selectable_and_unknown_is_an_error():
    assert set(POLICIES) == {"round_robin", "least_loaded", "prefix_aware", "sglang_cache_aware", "dynamo_kv_cost"}
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("nope")


@pytest.mark.parametrize(
    "decode_cached,prefill_queued,free,expected",
    [
        (990, 0, 1000, (True, "decode_has_prefix")),
        (0, 0, 1000, (False, "disaggregated")),
        (0, 10_000, 1000, (True, "prefill_saturated")),
        (0, 10_000, 100, (False, "disaggregated")),  # saturated, but the decode worker has no room
    ],
)
def test_disaggregation_decider(decode_cached, prefill_queued, free, expected):
    decode = cand("d", decode_cached, num_free_blocks=free)
    prefill = WorkerView("p", "prefill", num_prefill_tokens_queued=prefill_queued)
    assert decide_local_prefill(decode, prefill, REQ, DisaggConfig()) == expected
    assert decide_local_prefill(decode, None, REQ, DisaggConfig()) == (True, "no_prefill_worker")


# ---- the Router ----------------------------------------------------------------------------------
ROOT = root_hash("m")


def hashes(tokens):
    return block_hashes(tokens, 16, ROOT)


def stats(wid, role, t=None, **kw):
    base = dict(
        num_running=0,
        num_waiting=0,
        num_held=0,
        num_free_blocks=10**4,
        num_blocks=10**4,
        kv_usage=0.0,
        num_prefill_tokens_queued=0,
    )
    base.update(kw)
    return WorkerStats(worker_id=wid, role=role, time=time.time() if t is None else t, **base)


def make_router(policy="prefix_aware", prefill=4, decode=2, **kw):
    r = Router(RouterConfig(policy=policy, **kw))
    for i in range(prefill):
        r.register(f"p{i}", "prefill")
    for i in range(decode):
        r.register(f"d{i}", "decode")
    for wid, v in r.views.items():
        r.report(stats(wid, v.role))
        assert not r.report(stats(wid, v.role), KVEventBatch(worker_id=wid, epoch="e", seq=1, events=[]))
        r.resync(wid, "e", 1, [])  # the first batch of a stream always asks for a snapshot
    return r


def store(r, wid, seq, tokens):
    batch = KVEventBatch(
        worker_id=wid, epoch="e", seq=seq, events=[BlockStored(block_hashes=hashes(tokens), parent_hash=None)]
    )
    return r.report(stats(wid, r.views[wid].role), batch)


def req(tokens, rid="x"):
    return RouteRequest(request_id=rid, num_prompt_tokens=len(tokens), max_tokens=16, block_hashes=hashes(tokens))


PREFIX = list(range(1000, 1800))  # 800 tokens = 50 blocks


def test_a_request_goes_where_its_prefix_is_cached():
    r = make_router()
    assert store(r, "p2", 2, PREFIX)
    route = r.route(req(PREFIX + [1, 2, 3]))
    assert route.prefill_worker == "p2" and route.predicted_cached_tokens == 800
    assert route.reason == "disaggregated" and route.policy_reason == "prefix_hit"
    rr = make_router(policy="round_robin", disagg=DisaggConfig(local_prefill_max_tokens=-1))
    store(rr, "p2", 2, PREFIX)
    assert [rr.route(req(PREFIX + [i])).prefill_worker for i in range(4)] == ["p0", "p1", "p2", "p3"]


def test_a_burst_sharing_a_prefix_does_not_herd_onto_one_worker():
    r = make_router()
    store(r, "p0", 2, PREFIX)
    picks = [r.route(req(PREFIX + list(range(i, i + 100)), f"b{i}")).prefill_worker for i in range(50)]
    counts = {w: picks.count(w) for w in set(picks)}
    assert picks[0] == "p0"
    assert len(counts) == 4 and max(counts.values()) <= 25  # spread once p0 is loaded
    # and the others got the prefix once: later requests reuse it there (predicted cache entries)
    assert sum(1 for w in counts if w != "p0") == 3


def test_decode_worker_with_the_prefix_prefills_locally():
    r = make_router()
    store(r, "d1", 2, PREFIX)
    route = r.route(req(PREFIX + [7]))
    assert route.decode_worker == "d1" and route.prefill_worker is None and route.reason == "decode_has_prefix"


def test_index_consistency_under_eviction_death_and_gaps():
    r = make_router(max_index_blocks=60)
    store(r, "p1", 2, PREFIX)  # 50 blocks
    other = list(range(5000, 5320))  # 20 blocks: evicts the 10 least recently used entries
    store(r, "p3", 2, other)
    assert len(r.index) == 60
    assert r.index.match_all(hashes(PREFIX)).get("p1", 0) == 0  # its head was evicted: no prefix match
    assert r.index.match_all(hashes(other)).get("p3", 0) == 20
    # a gap in the event stream: nothing applied, resync asked for, snapshot replaces the entries
    gap = KVEventBatch(
        worker_id="p3", epoch="e", seq=9, events=[BlockStored(block_hashes=hashes(PREFIX), parent_hash=None)]
    )
    assert not r.report(stats("p3", "prefill"), gap)
    assert r.index.match_all(hashes(PREFIX)).get("p3", 0) == 0
    r.resync("p3", "e", 9, hashes(PREFIX))
    assert r.index.match_all(hashes(PREFIX)).get("p3", 0) == 50 and r.index.match_all(hashes(other)).get("p3", 0) == 0
    # a restart (new epoch) asks for a resync too
    assert not r.report(stats("p3", "prefill"), KVEventBatch(worker_id="p3", epoch="new", seq=1, events=[]))
    # a dead worker's entries disappear, and it is never picked
    r.report(stats("p3", "prefill", alive=False))
    assert "p3" not in r.views and r.index.num_blocks("p3") == 0
    assert all(r.route(req(PREFIX + [i])).prefill_worker != "p3" for i in range(8))


def test_a_report_supersedes_earlier_decisions_only():
    r = make_router(prefill=1, decode=2, policy="least_loaded")
    r.route(req([1] * 40))
    before = time.time()
    r.route(req([2] * 40))
    r.report(stats("d0", "decode", t=before, num_running=1))
    assert r.views["d0"].pending_requests == 0 and r.views["d0"].load == 1
    r.report(stats("d1", "decode", t=before - 10))
    assert r.views["d1"].pending_requests == 1  # decided after that report was taken: still counts


def test_admission_is_bounded_by_queues_and_free_blocks():
    r = make_router(prefill=1, decode=2, max_waiting_per_worker=2)
    for i in range(4):
        r.route(req([i] * 40))
    with pytest.raises(NoCapacity) as e:
        r.route(req([9] * 40))
    assert not e.value.unavailable
    r = make_router(prefill=1, decode=2)
    r.report(stats("d0", "decode", num_free_blocks=2))
    r.report(stats("d1", "decode", num_free_blocks=2))
    with pytest.raises(NoCapacity, match="full"):
        r.route(req([1] * 100))  # 7 blocks needed, 2 free on each decode worker
    assert r.route(req([1] * 20)).decode_worker in ("d0", "d1")
    r.remove("d0")
    r.remove("d1")
    with pytest.raises(NoCapacity) as e:
        r.route(req([1] * 20))
    assert e.value.unavailable


def test_requests_routed_since_a_report_fill_its_free_batch_slots_before_they_count_as_queued():
    # One colocated worker, 2 queued allowed: it reported 8 free batch slots, so 10 requests are admitted
    # before the next report (8 start at once, 2 wait); the 11th is refused. Reporting no free slots (an
    # older worker, or a full batch) keeps the old bound: 2.
    for free, admitted in ((8, 10), (0, 2)):
        r = Router(RouterConfig(policy="prefix_aware", max_waiting_per_worker=2))
        r.register("m0", "colocated")
        r.report(stats("m0", "colocated", t=time.time() - 1, num_free_slots=free))
        for i in range(admitted):
            r.route(req([i] * 40))
        with pytest.raises(NoCapacity):
            r.route(req([99] * 40))
        # the next report, taken after those decisions, says what happened: room again
        r.report(stats("m0", "colocated", num_running=min(free, admitted), num_waiting=admitted - min(free, admitted)))
        assert r.views["m0"].queue_depth == admitted - min(free, admitted)


def test_colocated_workers_prefill_locally():
    r = Router(RouterConfig(policy="prefix_aware"))
    r.register("m0", "colocated")
    r.report(stats("m0", "colocated"))
    route = r.route(req([1] * 40))
    assert route.prefill_worker is None and route.decode_worker == "m0" and route.reason == "colocated"


# ---- the ranked fast path against its oracle ------------------------------------------------------
def _random_router(rng, policy):
    r = make_router(policy=policy, prefill=6, decode=5, max_waiting_per_worker=6)
    prompts = [[rng.randrange(100) for _ in range(rng.randint(16, 160))] for _ in range(6)]
    for wid in r.views:
        chain = hashes(rng.choice(prompts))
        held = chain[: rng.randint(0, len(chain))]  # a prefix of a chain: what an engine caches
        batch = KVEventBatch(worker_id=wid, epoch="e", seq=2, events=[BlockStored(block_hashes=held, parent_hash=None)])
        kw = dict(num_running=rng.randint(0, 8), num_waiting=rng.randint(0, 7), num_free_blocks=rng.randint(0, 200))
        kw["num_prefill_tokens_queued"] = rng.choice([0, 0, 100, 5000])
        r.report(stats(wid, r.views[wid].role, num_blocks=200, **kw), batch)
    return r, prompts


@pytest.mark.parametrize("policy", ["prefix_aware", "dynamo_kv_cost", "least_loaded"])
def test_ranked_pools_pick_what_scoring_every_worker_picks(policy):
    """The Router scores only the best-ranked worker and one per match length; the policy's pick over every
    admissible worker is the oracle. Random loads, caches and prompts, with decisions recorded in between."""
    rng = random.Random(7)
    for trial in range(30):
        r, prompts = _random_router(rng, policy)
        oracle = make_policy(policy)
        for i in range(12):
            tokens = rng.choice(prompts)[: rng.randint(1, 160)] + [
                rng.randrange(100) for _ in range(rng.randint(1, 40))
            ]
            rq = req(tokens, f"t{trial}-{i}")
            found = r.index.match_all(rq.block_hashes)
            need = -(-(rq.num_prompt_tokens + 1) // 16)
            expected = {}
            for pool in ("decode", "prefill"):
                cands = [
                    Candidate(v, min(found.get(v.worker_id, 0) * 16, rq.num_prompt_tokens - 1))
                    for v in r.pools[pool].views.values()
                    if v.num_waiting + v.pending_requests < 6
                    and (pool == "prefill" or not v.num_blocks or v.num_blocks - v.used_blocks >= need)
                ]
                expected[pool] = oracle.pick(cands, rq, pool).worker_id if cands else None
            try:
                route = r.route(rq)
            except NoCapacity:
                assert expected["decode"] is None or (r.pools["prefill"].views and expected["prefill"] is None)
                continue
            assert route.decode_worker == expected["decode"]
            if route.prefill_worker is not None:
                assert route.prefill_worker == expected["prefill"]


def test_bisection_match_equals_a_walk_of_every_block():
    rng = random.Random(3)
    r = make_router(prefill=8, decode=8)
    chains = [hashes([rng.randrange(50) for _ in range(rng.randint(16, 4000))]) for _ in range(10)]
    chains.append(hashes(list(range(64 * 16))))  # 16 workers ending at 16 places: too many ends to bisect
    for i, wid in enumerate(r.views):
        r.index.predict(wid, chains[-1][: 3 * i + 1])
    for wid in r.views:
        events = [
            BlockStored(block_hashes=c[: rng.randint(0, len(c))], parent_hash=None) for c in rng.sample(chains, 4)
        ]
        r.report(stats(wid, r.views[wid].role), KVEventBatch(worker_id=wid, epoch="e", seq=2, events=events))
    r.index.predict("d3", chains[0])
    for c in chains:
        for n in (1, 2, 17, len(c)):
            walk = {}
            for wid in r.views:
                k = 0
                while k < n and wid in r.index.match_all(c[k : k + 1]):
                    k += 1
                if k:
                    walk[wid] = k
            assert r.index.match_all(c[:n]) == walk


def test_predictions_expire_and_keep_other_workers_bits():
    r = make_router()
    chain = hashes(PREFIX)
    r.index.predict("p1", chain[:30])
    r.index.predict_mask(r.index.bit("p2"), chain, 20, unheld_from=30)
    assert r.index.match_all(chain) == {"p1": 30}  # p2 lacks blocks 0-19, so its later blocks do not count
    r.index.predict("p2", chain[:20])
    assert r.index.match_all(chain) == {"p1": 30, "p2": 50}
    r.index.expire_predictions(now=time.monotonic() + 60)
    assert r.index.match_all(chain) == {}


def test_counts_and_bound_stay_exact_under_random_events():
    from pdserve.protocol import BlockRemoved

    rng = random.Random(5)
    r = make_router(prefill=3, decode=3, max_index_blocks=300)
    chains = [hashes([rng.randrange(30) for _ in range(rng.randint(16, 1600))]) for _ in range(12)]
    seqs = dict.fromkeys(r.views, 1)
    for _ in range(200):
        wid = rng.choice(list(r.views))
        c = rng.choice(chains)
        a, b = sorted(rng.sample(range(len(c) + 1), 2))
        event = (
            BlockStored(block_hashes=c[a:b], parent_hash=None)
            if rng.random() < 0.6
            else BlockRemoved(block_hashes=c[a:b])
        )
        seqs[wid] += 1
        assert r.report(
            stats(wid, r.views[wid].role), KVEventBatch(worker_id=wid, epoch="e", seq=seqs[wid], events=[event])
        )
        assert len(r.index) <= 300 and all(m for m in r.index._holders.values())
        for w in r.views:
            bit = r.index.bit(w)
            assert r.index.num_blocks(w) == sum(1 for m in r.index._holders.values() if m & bit)
            assert r.views[w].num_cached_blocks == r.index.num_blocks(w) or w != wid


def test_a_decision_predicts_a_bounded_number_of_blocks():
    r = make_router(max_predicted_blocks=64)
    long_prompt = list(range(3200))  # 200 blocks, cached nowhere
    route = r.route(req(long_prompt))
    assert len(r.index._predicted) == 64  # prefill and decode worker share the entries (one mask)
    chosen = route.prefill_worker or route.decode_worker
    assert r.index.match_all(hashes(long_prompt))[chosen] == 64
    unbounded = make_router(max_predicted_blocks=0)
    unbounded.route(req(long_prompt))
    assert len(unbounded.index._predicted) == 200


def test_predictions_past_the_limit_grow_a_decision_at_a_time():
    """A decision predicts at most 64 blocks past a worker's match, but the next one sent there starts from
    that match, so a burst on a 200-block prefix soon sees it whole where it went. The decode worker is
    predicted to hold what it imports, but prefills locally only once its own events show the prefix."""
    r = make_router(max_predicted_blocks=64)
    shared = list(range(10_000, 13_200))  # 200 blocks, cached nowhere
    routes = [r.route(req(shared + list(range(i, i + 40)), f"l{i}")) for i in range(24)]
    assert max(r.index.match_all(hashes(shared)).values()) == 200
    assert all(rt.reason == "disaggregated" for rt in routes)  # no import has landed yet
    for w in {rt.prefill_worker for rt in routes}:
        seen = [rt.predicted_cached_tokens for rt in routes if rt.prefill_worker == w]
        assert seen[0] == 0 and seen == sorted(seen) and seen[-1] == 3200
    decode = routes[-1].decode_worker
    assert store(r, decode, 2, shared)  # its events: the import landed
    route = r.route(req(shared + [1, 2, 3], "after"))
    assert route.decode_worker == decode and route.reason == "decode_has_prefix"
