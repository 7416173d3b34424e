"""Prompts longer than the token budget (chunked prefill): alone, where most steps sample nothing, and
joining requests that are already decoding; outputs equal the unchunked one-request-at-a-time run."""

import pytest

from pdserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, max_tokens=8, seed=5, ignore_eos=True)


def prompt(n, offset=0):
    return [(13 * i + offset) % 256 for i in range(n)]


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, in one step (no chunking), prefix caching off."""
    llm = LLM(num_kv_blocks=128, enable_prefix_caching=False, max_num_batched_tokens=4096)

    def run(tokens, params):
        out = llm.generate([tokens], params)[0]
        return out.token_ids, out.finish_reason

    return run


def run_to_end(engine):
    """Step until idle; per request its tokens and the step index of its first token and of its finish."""
    tokens, first, done = {}, {}, {}
    step = 0
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            first.setdefault(d.request_id, step)
            if d.finished:
                done[d.request_id] = (step, d.finish_reason)
        step += 1
    return tokens, first, done


def test_a_step_of_prefill_chunks_only_does_not_crash(reference):
    """The reproducer: a 200-token prompt with a 64-token budget; its first 3 steps sample nothing."""
    params = SamplingParams(max_tokens=4, temperature=0)
    out = LLM(max_num_batched_tokens=64).generate([list(range(10, 210))], params)[0]
    assert (out.token_ids, out.finish_reason) == reference(list(range(10, 210)), params)


@pytest.mark.parametrize("budget", [64, 13])  # 13: chunks end off block boundaries
@pytest.mark.parametrize("multiple", [1, 3, 10])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_long_prompt_alone(reference, budget, multiple, params):
    tokens = prompt(multiple * budget, budget)
    llm = LLM(num_kv_blocks=128, max_num_batched_tokens=budget)
    llm.engine.add_request("long", tokens, params)
    got, first, done = run_to_end(llm.engine)
    assert (got["long"], done["long"][1]) == reference(tokens, params)
    assert first["long"] == multiple - 1  # one chunk per step; every chunk but the last samples nothing
    llm.engine.blocks.check_no_leak()


@pytest.mark.parametrize("multiple", [1, 3, 10])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_long_prompt_joins_requests_already_decoding(reference, multiple, params):
    budget = 32
    llm = LLM(num_kv_blocks=256, max_num_batched_tokens=budget)
    eng = llm.engine
    decode_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = {f"d{i}": prompt(4 + 4 * i, i) for i in range(3)}  # 24 tokens: all prefill in the first step
    for rid, tokens in short.items():
        eng.add_request(rid, tokens, decode_params)
    early = {rid: [] for rid in short}
    for _ in range(3):
        for d in eng.step():
            early[d.request_id] += d.new_token_ids
    assert all(len(t) == 3 for t in early.values())  # decoding when the long prompt arrives
    long_tokens = prompt(multiple * budget, 7)
    eng.add_request("long", long_tokens, params)
    got, first, done = run_to_end(eng)
    assert first["long"] < min(step for step, _ in (done[rid] for rid in short))  # chunks ran beside decodes
    assert (got["long"], done["long"][1]) == reference(long_tokens, params)
    for rid, tokens in short.items():
        assert early[rid] + got[rid] == reference(tokens, decode_params)[0]
    eng.blocks.check_no_leak()


def test_two_long_prompts_and_a_decoder_share_the_budget(reference):
    budget = 16
    llm = LLM(num_kv_blocks=256, max_num_batched_tokens=budget)
    eng = llm.engine
    prompts = {"d": prompt(5, 3), "a": prompt(3 * budget + 5, 1), "b": prompt(10 * budget, 2)}
    params = {"d": SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), "a": SEEDED, "b": GREEDY}
    eng.add_request("d", prompts["d"], params["d"])
    (first,) = eng.step()
    eng.add_request("a", prompts["a"], params["a"])
    eng.add_request("b", prompts["b"], params["b"])
    got, _, _ = run_to_end(eng)
    got["d"] = first.new_token_ids + got["d"]
    for rid in prompts:
        assert got[rid] == reference(prompts[rid], params[rid])[0], rid
    eng.blocks.check_no_leak()
