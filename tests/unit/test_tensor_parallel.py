"""Tensor parallelism in the offline engine (Gloo, float32, CPU): the sharding tables, then greedy parity with
transformers at TP 2 and 4 where the heads allow. Most engines here run their ranks as threads of this process
(`tensor_parallel.LAUNCH = "thread"`: the same rank_main, no process start per rank); one runs them as the
spawned processes an engine really uses, and is stopped by handle."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine import tensor_parallel
from pdserve.engine.models.llama import ModelSpec
from pdserve.engine.parallel import check_degree, head_split, shard_tensor
from tests.models import build_hf_model, hf_greedy, text_prompt_ids

PROMPTS = [text_prompt_ids(n, off) for n, off in [(3, 5), (17, 1), (40, 11), (64, 9), (101, 60)]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def spec(**kw) -> ModelSpec:
    base = dict(vocab_size=10, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=8, num_kv_heads=2,
                head_dim=2, rms_norm_eps=1e-6, qkv_bias=False, o_bias=True, mlp_bias=False, qk_norm=False,
                tie_word_embeddings=False)  # fmt: skip
    return ModelSpec(**{**base, **kw})


def test_head_split_tables():
    s = spec()
    # 8 query heads, 2 KV heads at TP 4: each KV head replicated on two consecutive ranks
    assert [(h.q_start, h.num_heads, h.kv_start, h.num_kv_heads) for h in (head_split(s, 4, r) for r in range(4))] == [
        (0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)
    ]  # fmt: skip
    assert [(h.kv_start, h.num_kv_heads) for h in (head_split(s, 2, r) for r in range(2))] == [(0, 1), (1, 1)]
    # every rank's query heads read KV heads it holds (GQA group = 4 query heads per KV head)
    for size in (1, 2, 4, 8):
        for r in range(size):
            h = head_split(s, size, r)
            needed = {q // 4 for q in range(h.q_start, h.q_start + h.num_heads)}
            assert needed <= set(range(h.kv_start, h.kv_start + h.num_kv_heads)), (size, r)
    # a vocabulary of 10 at TP 4: 3 rows each (12 padded), the last rank has one real row
    assert [(h.vocab_start, h.vocab_rows) for h in (head_split(s, 4, r) for r in range(4))] == [
        (0, 3), (3, 3), (6, 3), (9, 3)
    ]  # fmt: skip


def test_check_degree_names_what_does_not_divide():
    with pytest.raises(ValueError, match="does not divide the model's 8 attention heads"):
        check_degree(spec(), 3)
    with pytest.raises(ValueError, match="6 KV heads"):
        check_degree(spec(num_heads=12, num_kv_heads=6), 4)
    with pytest.raises(ValueError, match="intermediate_size 12"):
        check_degree(spec(num_heads=16, num_kv_heads=16, intermediate_size=12), 8)


def test_shards_reassemble_the_full_tensors():
    s = spec(vocab_size=10)
    full = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 16),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 16),
        "model.layers.0.self_attn.o_proj.bias": torch.randn(16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 8),
        "model.embed_tokens.weight": torch.randn(10, 16),
    }
    splits = [head_split(s, 4, r) for r in range(4)]
    parts = {n: [shard_tensor(n, t, tuple(t.shape), s, splits[r], r) for r in range(4)] for n, t in full.items()}
    cat = lambda n, dim: torch.cat(parts[n], dim)  # noqa: E731
    assert torch.equal(cat("model.layers.0.self_attn.q_proj.weight", 0), full["model.layers.0.self_attn.q_proj.weight"])
    k = full["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(cat("model.layers.0.self_attn.k_proj.weight", 0), torch.cat([k[:2], k[:2], k[2:], k[2:]]))
    assert torch.equal(cat("model.layers.0.self_attn.o_proj.weight", 1), full["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(sum(parts["model.layers.0.self_attn.o_proj.bias"]), full["model.layers.0.self_attn.o_proj.bias"])
    assert torch.equal(cat("model.layers.0.mlp.down_proj.weight", 1), full["model.layers.0.mlp.down_proj.weight"])
    emb = cat("model.embed_tokens.weight", 0)
    assert emb.shape == (12, 16) and torch.equal(emb[:10], full["model.embed_tokens.weight"]) and not emb[10:].any()


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.setattr(tensor_parallel, "LAUNCH", "thread")


@pytest.fixture(scope="module")
def odd_heads_dir(tmp_path_factory):
    """Qwen2 (q/k/v biases), tied embeddings, 6 query heads (3 per rank at TP 2), 2 KV heads, vocab 401."""
    return build_hf_model(
        tmp_path_factory.mktemp("odd") / "m", "qwen2", seed=1, hidden_size=96, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=401,
    )  # fmt: skip


def generate_tp(model_dir, tp: int, prompts=PROMPTS, params=GREEDY, **kw) -> list[list[int]]:
    with LLM(str(model_dir), tensor_parallel_size=tp, num_kv_blocks=kw.pop("num_kv_blocks", 128), **kw) as llm:
        first = [o.token_ids for o in llm.generate(prompts, params)]
        again = llm.generate(prompts, params)  # from the prefix cache
        assert [o.token_ids for o in again] == first
        assert again[-1].num_cached_tokens > 0
        llm.engine.blocks.check_no_leak()
    return first


@pytest.mark.parametrize(
    "fixture,tp",
    [
        ("llama_dir", 2),
        ("llama_dir", 4),
        ("mistral_dir", 2),
        ("mistral_dir", 4),
        ("odd_heads_dir", 2),
        ("qwen3_dir", 2),
    ],
    ids=["gqa-1kv-per-rank", "2kv-at-tp4", "1kv-at-tp2", "1kv-at-tp4", "odd-heads-tied-vocab401", "qk-norm"],
)
def test_greedy_parity_with_transformers(fixture, tp, threads, request):
    model_dir = request.getfixturevalue(fixture)
    expected = [hf_greedy(model_dir, p, GREEDY.max_tokens) for p in PROMPTS]
    assert generate_tp(model_dir, tp) == expected


def test_chunked_prefill_and_preemption_at_tp2(llama_dir, threads):
    expected = [hf_greedy(llama_dir, p, GREEDY.max_tokens) for p in PROMPTS]
    # 32-token steps chunk every longer prompt; 12 blocks of 16 cannot hold all five at once: preemption
    with LLM(str(llama_dir), tensor_parallel_size=2, num_kv_blocks=12, max_num_batched_tokens=32) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
        assert llm.engine.num_preemptions_total > 0
        llm.engine.blocks.check_no_leak()


def test_spawned_ranks_sample_as_tp1_and_a_killed_rank_fails_the_next_step(llama_dir):
    """The real launch (processes): seeded sampling gives TP 1's tokens; after SIGKILL of rank 1 the next step
    raises at once (the dead peer's sockets are closed) instead of hanging; close() leaves nothing running."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7 + i, ignore_eos=True) for i in range(3)]
    with LLM(str(llama_dir), num_kv_blocks=128) as one:
        expected = [o.token_ids for o in one.generate(PROMPTS[:3], params)]
    llm = LLM(str(llama_dir), tensor_parallel_size=2, num_kv_blocks=128)
    [proc] = llm.engine.ranks.procs
    try:
        assert proc.name == "pdserve-tp1" and proc.is_alive() and proc.pid
        assert [o.token_ids for o in llm.generate(PROMPTS[:3], params)] == expected
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
            llm.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - start < 30
    finally:
        llm.close()
        llm.close()
    assert not proc.is_alive()
