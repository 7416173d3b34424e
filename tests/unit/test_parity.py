"""Greedy token parity between pdserve and transformers on tiny random-weight models (float32, CPU)."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from tests.models import build_hf_model, hf_greedy, text_prompt_ids, top1_gaps

MODEL_FIXTURES = ["llama_dir", "qwen2_dir", "qwen3_dir", "mistral_dir", "llama3_rope_dir", "sharded_dir"]

# (length, offset into the corpus): shorter than a block, > block_size and not a multiple, several blocks.
PARITY_PROMPTS = [(5, 0), (40, 11), (100, 23)]
# one batch, lengths 3..150: inside one block, exactly 2 and 4 blocks, ragged, longer than 128.
BATCH_PROMPTS = [(3, 5), (17, 1), (32, 40), (64, 9), (101, 60), (150, 2)]
MAX_TOKENS = 16
NUM_KV_BLOCKS = 256  # explicit, small: keeps each LLM's cache allocation tiny


def make_llm(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", NUM_KV_BLOCKS)
    kwargs.setdefault("dtype", "float32")
    return LLM(model=str(model_dir), **kwargs)


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def prompts_for(specs) -> list[list[int]]:
    return [text_prompt_ids(n, off) for n, off in specs]


def assert_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished()
    llm.engine.blocks.check_no_leak()


MIN_TOP1_GAP = 5e-4  # float32 logits of two correct implementations differ by ~1e-5 at most here


def assert_clear_margins(model_dir, prompts) -> None:
    for prompt in prompts:
        new = hf_greedy(model_dir, prompt, MAX_TOKENS)
        gaps = top1_gaps(model_dir, prompt + new)[len(prompt) - 1 : -1]
        assert gaps.min().item() > MIN_TOP1_GAP, (
            f"test data has a near-tie ({gaps.min().item():.1e}) after a {len(prompt)}-token prompt: "
            "change the fixture's seed"
        )


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_reference_has_clear_top1_margins(fixture, request):
    """Guard on the test data, not on pdserve: along every reference trajectory used below, HF's top-1
    logit beats the runner-up by far more than float32 noise, so a parity failure is a real bug."""
    model_dir = request.getfixturevalue(fixture)
    assert_clear_margins(model_dir, prompts_for(PARITY_PROMPTS))
    if fixture in ("llama_dir", "qwen3_dir"):
        assert_clear_margins(model_dir, prompts_for(BATCH_PROMPTS))


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_greedy_parity_with_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    prompts = prompts_for(PARITY_PROMPTS)
    expected = [hf_greedy(model_dir, p, MAX_TOKENS) for p in prompts]
    llm = make_llm(model_dir)
    for prompt, exp in zip(prompts, expected, strict=True):
        [out] = llm.generate([prompt], greedy())
        assert out.prompt_token_ids == prompt
        assert out.num_prompt_tokens == len(prompt)
        assert out.token_ids == exp, f"prompt of {len(prompt)} tokens diverged from transformers"
        assert out.finish_reason == "length"
    assert_idle(llm)


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen3_dir"])
def test_batched_mixed_lengths_match_single_and_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    prompts = prompts_for(BATCH_PROMPTS)
    expected = [hf_greedy(model_dir, p, MAX_TOKENS) for p in prompts]

    llm = make_llm(model_dir, enable_prefix_caching=False)
    batched = llm.generate(prompts, greedy())
    assert [o.prompt_token_ids for o in batched] == prompts  # outputs come back in prompt order
    alone = [llm.generate([p], greedy())[0] for p in prompts]
    for p, b, a, exp in zip(prompts, batched, alone, expected, strict=True):
        assert a.token_ids == exp, f"alone, {len(p)}-token prompt"
        assert b.token_ids == exp, f"batched, {len(p)}-token prompt"
    assert_idle(llm)


def test_prefix_cache_hits_keep_parity(llama_dir):
    prompts = prompts_for(BATCH_PROMPTS)
    expected = [hf_greedy(llama_dir, p, MAX_TOKENS) for p in prompts]
    llm = make_llm(llama_dir, enable_prefix_caching=True)
    first = llm.generate(prompts, greedy())
    second = llm.generate(prompts, greedy())
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    assert second[-1].num_cached_tokens > 0  # the 150-token prompt was served from the cache
    assert all(o.num_cached_tokens < o.num_prompt_tokens for o in second)
    assert_idle(llm)


def test_chunked_prefill_matches_default(llama_dir):
    prompts = prompts_for(BATCH_PROMPTS)
    expected = [hf_greedy(llama_dir, p, MAX_TOKENS) for p in prompts]
    default = make_llm(llama_dir).generate(prompts, greedy())
    chunked_llm = make_llm(llama_dir, max_num_batched_tokens=32)
    chunked = chunked_llm.generate(prompts, greedy())
    assert [o.token_ids for o in default] == expected
    assert [o.token_ids for o in chunked] == [o.token_ids for o in default]
    assert_idle(chunked_llm)


def test_bfloat16_smoke(llama_dir):
    llm = make_llm(llama_dir, dtype="bfloat16")
    outs = llm.generate(prompts_for([(5, 0), (40, 11)]), greedy(8))
    vocab = len(llm.tokenizer)
    for out in outs:
        assert len(out.token_ids) == 8
        assert out.finish_reason == "length"
        assert all(0 <= t < vocab for t in out.token_ids)
    assert_idle(llm)


def test_bfloat16_checkpoint_loaded_as_float32_matches_transformers(tmp_path):
    """bf16 weights on disk, both sides upcast to float32: exact parity still expected."""
    model_dir = build_hf_model(tmp_path / "bf16", "llama", dtype="bfloat16", seed=1)
    prompt = text_prompt_ids(40, 11)
    assert_clear_margins(model_dir, [prompt])
    expected = hf_greedy(model_dir, prompt, MAX_TOKENS)
    [out] = make_llm(model_dir).generate([prompt], greedy())
    assert out.token_ids == expected


def test_chat_applies_template(llama_dir):
    llm = make_llm(llama_dir)
    messages = [{"role": "user", "content": "hello"}]
    outs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5))
    assert len(outs) == 1
    assert outs[0].prompt_token_ids == _chat_ids(llm.tokenizer, messages)
    assert 1 <= len(outs[0].token_ids) <= 5

    conversations = [
        messages,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"}],
    ]
    outs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == [_chat_ids(llm.tokenizer, c) for c in conversations]
    assert all(len(o.token_ids) == 5 for o in outs)
    assert_idle(llm)


def _chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 may hand back a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@pytest.mark.parametrize(
    "fixture,options",
    [
        ("llama_dir", {"attention_backend": "flashinfer_reference"}),
        ("qwen3_dir", {"attention_backend": "flashinfer_reference"}),  # grouped-query heads
        ("qwen3_dir", {"cuda_graphs": True}),  # static buffers and padding, uncaptured on CPU
        ("llama_dir", {"cuda_graphs": True, "attention_backend": "flashinfer_reference"}),
    ],
)
def test_other_attention_paths_keep_parity(fixture, options, request):
    """Batched ragged prompts, chunked (mixed prefill/decode steps), then again from the prefix cache."""
    model_dir = request.getfixturevalue(fixture)
    prompts = prompts_for(BATCH_PROMPTS)
    expected = [hf_greedy(model_dir, p, MAX_TOKENS) for p in prompts]
    llm = make_llm(model_dir, max_num_batched_tokens=64, **options)
    assert llm.engine.runner.backend.name == options.get("attention_backend", "torch")
    first = llm.generate(prompts, greedy())
    second = llm.generate(prompts, greedy())
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    assert second[-1].num_cached_tokens > 0
    graphs = llm.engine.runner.graphs
    if options.get("cuda_graphs"):
        assert graphs.num_steps >= 2 * (MAX_TOKENS - 1) and graphs.num_replays == 0
    else:
        assert graphs is None
    assert_idle(llm)
