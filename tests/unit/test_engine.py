"""Engine mechanics on the embedded demo model: prefix cache, eviction, preemption, handoff, leaks."""

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.engine import LLMEngine, OutOfKVBlocks

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompt(n, offset=0):
    return [(7 * i + offset) % 250 for i in range(n)]


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=512)


def reference(tokens_list, params=GREEDY):
    """Each prompt alone on a fresh engine with prefix caching off: the oracle for every mechanism."""
    ref = LLM(num_kv_blocks=512, enable_prefix_caching=False)
    return [ref.generate([p], params)[0].token_ids for p in tokens_list]


def run_to_end(engine, ids):
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.new_token_ids
    return out


def test_prefix_cache_computes_only_the_uncached_suffix(llm):
    eng = llm.engine
    shared = prompt(100)
    first, second = shared + [1, 2, 3], shared + [9, 8, 7, 6, 5]
    before = eng.num_computed_tokens_total
    a = llm.generate([first], GREEDY)[0]
    computed_a = eng.num_computed_tokens_total - before
    before = eng.num_computed_tokens_total
    b = llm.generate([second], GREEDY)[0]
    computed_b = eng.num_computed_tokens_total - before
    # 100 shared tokens -> 6 full blocks of 16 = 96 cached tokens; the rest is computed
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 96
    assert computed_a == len(first) + GREEDY.max_tokens - 1
    assert computed_b == len(second) - 96 + GREEDY.max_tokens - 1
    assert [a.token_ids, b.token_ids] == reference([first, second])
    eng.blocks.check_no_leak()


def test_evicted_blocks_are_recomputed_correctly():
    llm = LLM(num_kv_blocks=24)  # 384 tokens: each 200-token request evicts the other's prefix
    p1, p2 = prompt(200, 1), prompt(200, 3)
    outs = [llm.generate([p], GREEDY)[0] for p in (p1, p2, p1, p2)]
    assert outs[2].num_cached_tokens < 192  # p1's blocks were (at least partly) evicted by p2
    assert [o.token_ids for o in outs] == reference([p1, p2, p1, p2])
    llm.engine.blocks.check_no_leak()


def test_preemption_under_a_tiny_block_budget_keeps_outputs():
    prompts = [prompt(40 + 10 * i, i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = LLM(num_kv_blocks=16, enable_prefix_caching=False)
    outs = small.generate(prompts, params)
    assert small.engine.num_preemptions_total > 0
    assert [o.token_ids for o in outs] == reference(prompts, params)
    small.engine.blocks.check_no_leak()


def test_batched_equals_one_at_a_time_with_chunked_prefill():
    prompts = [prompt(n, n) for n in (3, 17, 64, 150, 33)]
    llm = LLM(num_kv_blocks=512, max_num_batched_tokens=40)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference(prompts)


@pytest.mark.parametrize(
    "params", [GREEDY, SamplingParams(temperature=0.9, top_p=0.9, max_tokens=24, seed=11, ignore_eos=True)]
)
def test_prefill_export_import_decode_continues_exactly(params):
    p = prompt(70, 5)
    expected = LLM(num_kv_blocks=256).generate([p], params)[0].token_ids
    src, dst = LLMEngine(_cfg()), LLMEngine(_cfg())
    src.add_request("r", p, params, role="prefill")
    deltas = src.step()
    while not deltas:
        deltas = src.step()
    (first,) = deltas
    assert first.held and not first.finished and len(first.new_token_ids) == 1
    assert not src.has_unfinished()
    record, src_blocks = src.handoff.export_request("r")
    reservation = dst.handoff.import_request(record)
    n = reservation.num_cached_blocks
    dst.kv_cache[reservation.block_ids[n:]] = src.kv_cache[src_blocks[n:]]
    dst.handoff.finish_import("r")
    src.handoff.release("r")
    src.blocks.check_no_leak()
    rest = run_to_end(dst, ["r"])["r"]
    assert first.new_token_ids + rest == expected
    dst.blocks.check_no_leak()


def test_live_migration_of_a_decoding_request():
    p = prompt(40, 2)
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=3, ignore_eos=True)
    expected = LLM(num_kv_blocks=256).generate([p], params)[0].token_ids
    src, dst = LLMEngine(_cfg()), LLMEngine(_cfg())
    src.add_request("m", p, params)
    got = []
    while len(got) < 10:
        for d in src.step():
            got += d.new_token_ids
    record, blocks = src.handoff.export_request("m")
    res = dst.handoff.import_request(record)
    dst.kv_cache[res.block_ids] = src.kv_cache[blocks]
    dst.handoff.finish_import("m")
    src.handoff.release("m")
    got += run_to_end(dst, ["m"])["m"]
    assert got == expected
    src.blocks.check_no_leak()
    dst.blocks.check_no_leak()


def test_import_reuses_the_receivers_prefix_cache():
    p = prompt(64, 9)
    src, dst = LLMEngine(_cfg()), LLMEngine(_cfg())
    dst.add_request("warm", p + [1], GREEDY)
    run_to_end(dst, ["warm"])
    src.add_request("r", p + [2, 3], GREEDY, role="prefill")
    while not src.step():
        pass
    record, _ = src.handoff.export_request("r")
    res = dst.handoff.import_request(record)
    assert res.num_cached_blocks == 4
    dst.abort("r")
    src.handoff.release("r")
    dst.blocks.check_no_leak()
    src.blocks.check_no_leak()


def test_import_rejects_a_mismatched_peer_and_reports_full_cache():
    src = LLMEngine(_cfg())
    src.add_request("r", prompt(20), GREEDY, role="prefill")
    while not src.step():
        pass
    record, _ = src.handoff.export_request("r")
    with pytest.raises(ValueError, match="block_size"):
        LLMEngine(_cfg(block_size=32)).handoff.import_request(record)
    with pytest.raises(OutOfKVBlocks):
        tiny = LLMEngine(_cfg(num_kv_blocks=3))
        tiny.add_request("x", prompt(30, 5), SamplingParams(max_tokens=4), role="prefill")
        while not tiny.step():
            pass
        tiny.handoff.import_request(record)
    src.handoff.release("r")
    src.blocks.check_no_leak()


def test_abort_in_every_state_frees_blocks():
    eng = LLMEngine(_cfg())
    for i in range(4):
        eng.add_request(f"a{i}", prompt(50, i), GREEDY)
    eng.step()
    eng.add_request("w", prompt(30), GREEDY)  # still waiting
    eng.add_request("h", prompt(30, 1), GREEDY, role="prefill")
    while "h" not in {d.request_id for d in eng.step()}:
        pass
    for rid in ["a0", "a1", "a2", "a3", "w", "h"]:
        assert eng.abort(rid)
    assert not eng.abort("nope")
    assert not eng.has_unfinished()
    eng.blocks.check_no_leak()


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=16, seed=42)
    alone = llm.generate([prompt(10)], params)[0].token_ids
    together = llm.generate([prompt(10), prompt(33, 1), prompt(10)], [params, SamplingParams(seed=1), params])
    assert together[0].token_ids == alone == together[2].token_ids
    other = llm.generate([prompt(10)], SamplingParams(temperature=1.0, top_k=50, max_tokens=16, seed=43))[0]
    assert other.token_ids != alone


def test_top_k_one_is_greedy_and_stop_conditions(llm):
    p = prompt(12)
    greedy = llm.generate([p], GREEDY)[0]
    topk1 = llm.generate([p], SamplingParams(temperature=1.5, top_k=1, max_tokens=24, ignore_eos=True, seed=1))[0]
    assert topk1.token_ids == greedy.token_ids
    stop_tok = greedy.token_ids[5]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_tok) + 1]
    stop_str = greedy.text[8:11]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, stop=[stop_str]))[0]
    assert out.finish_reason == "stop" and out.text == greedy.text[: greedy.text.index(stop_str)]
    out = llm.generate(
        [p], SamplingParams(temperature=0, max_tokens=24, stop=[stop_str], include_stop_str_in_output=True)
    )[0]
    assert out.text == greedy.text[: greedy.text.index(stop_str) + len(stop_str)]
    assert llm.generate([p], SamplingParams(temperature=0, max_tokens=5))[0].finish_reason == "length"


def test_logprobs(llm):
    out = llm.generate([prompt(8)], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and abs(lp.top[0][1] - lp.logprob) < 1e-5 and lp.logprob <= 0


def test_context_limit_ends_with_length():
    llm = LLM(max_model_len=48, num_kv_blocks=64)
    out = llm.generate([prompt(40)], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8


def _cfg(**kw):
    from pdserve.config import EngineConfig

    kw.setdefault("num_kv_blocks", 256)
    return EngineConfig(**kw)


def test_queued_prefill_tokens_leave_out_the_cached_prefix():
    """The load report counts the prompt tokens still to compute: a waiting request whose prefix is cached
    counts only its suffix (the router's prefill cost reads this number)."""
    eng = LLMEngine(_cfg())
    shared = prompt(100)
    eng.add_request("a", shared + [1, 2, 3], GREEDY)
    run_to_end(eng, ["a"])
    assert eng.stats()["num_prefill_tokens_queued"] == 0
    eng.add_request("b", shared + [9, 8, 7, 6, 5], GREEDY)  # 105 tokens, 96 of them cached
    eng.add_request("c", prompt(50, 3), GREEDY)  # nothing cached
    assert eng.stats()["num_prefill_tokens_queued"] == (105 - 96) + 50
    out = run_to_end(eng, ["b", "c"])
    assert all(len(v) == GREEDY.max_tokens for v in out.values())
    eng.blocks.check_no_leak()


def test_a_requests_generator_is_on_the_engines_device():
    """Sampling draws noise on the logits' device with the request's generator, so the generator lives there (a
    CPU generator with CUDA logits raises in the step). Its state, exported with a handoff, is restored on the
    peer's generator (test_prefill_export_import_decode_continues_exactly checks the tokens that follow)."""
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    src, dst = LLMEngine(_cfg()), LLMEngine(_cfg())
    src.add_request("r", prompt(9), params, role="prefill")
    while not src.step():
        pass
    record, _ = src.handoff.export_request("r")
    dst.handoff.import_request(record)
    for eng in (src, dst):
        assert eng.requests["r"].generator.device == eng.device
    assert torch.equal(dst.requests["r"].generator.get_state(), src.requests["r"].generator.get_state())
