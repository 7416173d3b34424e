"""Tenant isolation in the prefix cache: `cache_salt` roots the hash chain (engine, handoff, global index,
routing), and a cache hit is verified by tokens and ancestry, so even colliding hashes never serve KV
computed for other tokens."""

from __future__ import annotations

import asyncio
import random
import time
from functools import cache

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve import LLM, SamplingParams
from pdserve.config import EngineConfig, ServeConfig
from pdserve.engine import handoff as engine_handoff
from pdserve.engine import sequence
from pdserve.engine.engine import LLMEngine
from pdserve.hashing import block_hashes, root_hash
from pdserve.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineRequest,
    KVEventBatch,
    RouteRequest,
    WorkerStats,
)

BS = 16  # the engine's default block size
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 250) for _ in range(n)]


@cache
def uncached(prompt: tuple[int, ...], max_tokens: int = GREEDY.max_tokens) -> tuple[int, ...]:
    """The oracle: greedy tokens of the prompt alone, prefix caching off."""
    out = _reference_llm().generate([list(prompt)], msgspec.structs.replace(GREEDY, max_tokens=max_tokens))
    return tuple(out[0].token_ids)


@cache
def _reference_llm() -> LLM:
    return LLM(num_kv_blocks=256, enable_prefix_caching=False)


def cached_ids(engine: LLMEngine, prompt: list[int], salt: str | None) -> list[int]:
    """Blocks of `engine`'s prefix cache a request for `prompt` under `salt` would reuse."""
    root = root_hash(engine.model_id, salt)
    return engine.blocks.cached_prefix(block_hashes(prompt, BS, root), prompt, root)


# ---- one engine ------------------------------------------------------------------------------------


def test_different_salts_share_no_blocks_the_same_salt_does():
    llm = LLM(num_kv_blocks=256)
    p = tokens(1, 100)  # 6 full blocks
    a1 = llm.generate([p], GREEDY, cache_salt="tenant-a")[0]
    b1 = llm.generate([p], GREEDY, cache_salt="tenant-b")[0]
    none = llm.generate([p], GREEDY)[0]
    a2 = llm.generate([p], GREEDY, cache_salt="tenant-a")[0]
    b2 = llm.generate([p], GREEDY, cache_salt="tenant-b")[0]
    assert (a1.num_cached_tokens, b1.num_cached_tokens, none.num_cached_tokens) == (0, 0, 0)
    assert a2.num_cached_tokens == b2.num_cached_tokens == 96
    by_salt = {s: set(cached_ids(llm.engine, p, s)) for s in ("tenant-a", "tenant-b", None)}
    assert all(len(ids) == 6 for ids in by_salt.values())
    assert not (
        by_salt["tenant-a"] & by_salt["tenant-b"] or by_salt[None] & (by_salt["tenant-a"] | by_salt["tenant-b"])
    )
    assert {tuple(o.token_ids) for o in (a1, b1, none, a2, b2)} == {uncached(tuple(p))}
    llm.engine.blocks.check_no_leak()


def test_an_invalid_salt_is_refused():
    eng = LLMEngine(EngineConfig(num_kv_blocks=32))
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt"):
            eng.add_request("r", [1, 2, 3], GREEDY, cache_salt=bad)
    assert not eng.requests


def _prefill(src: LLMEngine, rid: str, prompt: list[int], salt: str | None):
    src.add_request(rid, prompt, GREEDY, role="prefill", cache_salt=salt)
    while not src.step():
        pass
    return src.handoff.export_request(rid)


def test_the_salt_travels_with_a_kv_handoff_and_a_migration_stage():
    p = tokens(2, 70)
    src, dst = LLMEngine(EngineConfig(num_kv_blocks=64)), LLMEngine(EngineConfig(num_kv_blocks=64))
    record, src_blocks = _prefill(src, "r", p, "tenant-a")
    assert record.cache_salt == "tenant-a"
    record = msgspec.msgpack.decode(msgspec.msgpack.encode(record), type=type(record))  # as on the wire
    res = dst.handoff.import_request(record)
    dst.kv_cache[res.block_ids] = src.kv_cache[src_blocks]
    dst.handoff.finish_import("r")
    src.handoff.release("r")
    while dst.has_unfinished():
        dst.step()
    # the receiver cached the imported KV under the request's salt only
    assert len(cached_ids(dst, p, "tenant-a")) == 4 and not cached_ids(dst, p, "tenant-b") + cached_ids(dst, p, None)
    record, _ = _prefill(src, "s", p, "tenant-b")  # another tenant's import reuses nothing there
    assert dst.handoff.import_request(record).num_cached_blocks == 0
    dst.abort("s")
    src.handoff.release("s")
    # a live-migration stage looks the receiver's cache up under the salt it carries
    for salt, reused in (("tenant-a", 4), ("tenant-b", 0), (None, 0)):
        ids, n = dst.handoff.stage_blocks(p[:64], [], salt)
        assert (len(ids), n) == (4, reused)
        dst.handoff.drop_blocks(ids)
    src.blocks.check_no_leak()
    dst.blocks.check_no_leak()


# ---- forced hash collisions ------------------------------------------------------------------------


def _collide(monkeypatch, mode: str) -> None:
    if mode == "8-bit":  # BLAKE2b cut to one byte: 256 values, colliding all the time
        monkeypatch.setattr("pdserve.hashing.HASH_BYTES", 1)
        return

    def forced(token_ids, block_size, root, start=None):
        n = len(token_ids) // block_size
        if mode == "constant":
            return [b"same"] * n
        # "positional": a hash of the block's position and own tokens, blind to the prefix and the salt
        return [f"{i}:{token_ids[i * block_size : (i + 1) * block_size]}".encode() for i in range(n)]

    monkeypatch.setattr(sequence, "block_hashes", forced)
    monkeypatch.setattr(engine_handoff, "block_hashes", forced)


@pytest.mark.parametrize("mode", ["constant", "positional", "8-bit"])
def test_colliding_hashes_never_serve_another_prompts_kv(monkeypatch, mode):
    _collide(monkeypatch, mode)
    x, x2, y, z = tokens(10, BS), tokens(11, BS), tokens(12, BS), tokens(13, BS)
    tail = [5, 6, 7]
    # A caches x|y|z. C caches x2|y: under a positional hash its y block collides with A's y block, whose
    # KV was computed after x. B = x2|y|z|...: its chain of hashes matches C's x2 block, then A's y and z
    # blocks (hash and tokens equal): only the ancestry check keeps A's KV out of B.
    prompts = [x + y + z + tail, x2 + y + tail, x2 + y + z + tail, x + y + z + [9]]
    prompts += [tokens(100 + i, 40 + 13 * i) for i in range(12)]  # more blocks: collisions at 8 bits
    prompts += [p[: len(p) // 2] + tokens(200 + i, 20) for i, p in enumerate(prompts[4:10])]
    llm = LLM(num_kv_blocks=256)
    outs = [llm.generate([p], GREEDY, cache_salt="s" if i % 3 == 0 else None)[0] for i, p in enumerate(prompts)]
    together = llm.generate(prompts, GREEDY)  # and batched, sharing the cache concurrently
    for p, o, t in zip(prompts, outs, together):
        assert tuple(o.token_ids) == tuple(t.token_ids) == uncached(tuple(p)), p
    if mode == "positional":
        assert outs[2].num_cached_tokens == BS  # x2 only (from C), not A's y and z
    llm.engine.blocks.check_no_leak()


# ---- property: outputs equal the uncached run; hits exactly where prompt and salt share blocks ------


SHARED = [tokens(300 + i, 3 * BS) for i in range(3)]


@st.composite
def requests(draw):
    out = []
    for _ in range(draw(st.integers(2, 6))):
        base = SHARED[draw(st.integers(0, len(SHARED) - 1))][: draw(st.integers(0, 3 * BS))]
        prompt = base + tokens(draw(st.integers(0, 10**6)), draw(st.integers(1, 24)))
        out.append((prompt, draw(st.sampled_from([None, "a", "b"]))))
    return out


def _shared_blocks(p: list[int], q: list[int]) -> int:
    n = 0
    while n < min(len(p) - 1, len(q)) // BS and p[n * BS : (n + 1) * BS] == q[n * BS : (n + 1) * BS]:
        n += 1
    return n


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(reqs=requests(), narrow=st.booleans())
def test_hits_only_within_a_salt_and_outputs_equal_uncached(reqs, narrow):
    with pytest.MonkeyPatch.context() as mp:
        if narrow:
            _collide(mp, "8-bit")
        llm = LLM(num_kv_blocks=256)  # room for every block: nothing is evicted
        for i, (prompt, salt) in enumerate(reqs):
            out = llm.generate([prompt], GREEDY, cache_salt=salt)[0]
            assert tuple(out.token_ids) == uncached(tuple(prompt))
            expect = max([_shared_blocks(prompt, q) for q, s in reqs[:i] if s == salt], default=0) * BS
            if narrow:  # a collision may cost a hit (its slot is taken), never give a wrong one
                assert out.num_cached_tokens <= expect
            else:
                assert out.num_cached_tokens == expect
        llm.engine.blocks.check_no_leak()


# ---- the global index, fed by real engine events, queried as the cluster client routes ----------------


class _DirectRouter:
    """The cluster client's RouteBatcher, minus the controller: decisions from an in-process Router."""

    def __init__(self, router) -> None:
        self.router = router

    async def route(self, req: RouteRequest):
        return self.router.route(req)


def test_global_index_matches_salted_blocks_only_under_the_same_salt():
    from pdserve.cluster.client import ClusterClient
    from pdserve.model_info import load_model_info
    from pdserve.router.router import Router, RouterConfig

    eng = LLMEngine(EngineConfig(num_kv_blocks=64))
    eng.take_kv_events()  # start recording
    p = tokens(3, 100)
    eng.add_request("warm", p, GREEDY, cache_salt="tenant-a")
    while eng.has_unfinished():
        eng.step()
    router = Router(RouterConfig(policy="prefix_aware", block_size=BS))
    for wid in ("w0", "w1"):
        router.register(wid, "colocated")
        stats = WorkerStats(worker_id=wid, role="colocated", num_running=0, num_waiting=0, num_held=0,
                            num_free_blocks=64, num_blocks=64, kv_usage=0.0, num_prefill_tokens_queued=0,
                            time=time.time())  # fmt: skip
        router.report(stats)
        router.resync(wid, "e", 0, [])
    wire = msgspec.msgpack.encode(eng.take_kv_events())  # 128-bit hashes cross as msgpack bin
    events = msgspec.msgpack.decode(wire, type=list[BlockStored | BlockRemoved | AllBlocksCleared])
    assert events and all(len(h) == 16 for e in events for h in e.block_hashes)
    assert router.report(
        stats, KVEventBatch(worker_id="w1", epoch="e", seq=1, events=events)
    )  # w0's stats are as good as any: only the events matter here

    client = ClusterClient(load_model_info(None), None, ServeConfig())
    client.router = _DirectRouter(router)

    def route(salt: str | None, prompt=p):
        req = EngineRequest(request_id=f"r-{salt}", prompt_token_ids=prompt, params=GREEDY, cache_salt=salt)
        return asyncio.run(client._route(req))

    index = router.index
    assert index.match_all(block_hashes(p, BS, root_hash(eng.model_id, "tenant-a"))) == {"w1": 6}
    for salt in ("tenant-b", None):
        assert index.match_all(block_hashes(p, BS, root_hash(eng.model_id, salt))) == {}
    same = route("tenant-a", p + [1, 2])
    assert same.decode_worker == "w1" and same.predicted_cached_tokens == 96
    for salt in ("tenant-b", None):  # (each routing decision adds predictions, under its own salt)
        assert route(salt, p + [3]).predicted_cached_tokens == 0
