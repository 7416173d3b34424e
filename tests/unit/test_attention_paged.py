"""FlashInfer's paged format and the backends that read it: the metadata builder against hand tables, the
vectorised step builder against a per-token loop, and `flashinfer_reference` against the torch backend and
dense SDPA on randomized paged batches; the static-shape decode path's padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.config import EngineConfig
from pdserve.engine.attention.flashinfer_reference import FlashInferReference
from pdserve.engine.attention.paged import build_paged
from pdserve.engine.attention.torch_backend import TorchAttention
from pdserve.engine.cuda_graphs import capture_sizes
from pdserve.engine.step_inputs import StepInputBuilder


class Req:
    """The fields of a Request that the step builder reads."""

    def __init__(self, tokens: list[int], computed: int, block_ids: list[int]) -> None:
        self.all_token_ids, self.num_computed_tokens, self.block_ids = tokens, computed, block_ids

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def test_build_paged_matches_hand_tables():
    table = np.array([[7, 3, 9, 0], [5, 0, 0, 0], [2, 4, 6, 8]], dtype=np.int32)
    # a 2-token chunk ending at 18 tokens; a decode at 3 tokens; a 16-token prefill (exactly one full page... x2)
    p = build_paged(np.array([2, 1, 16]), np.array([18, 3, 32]), table, page_size=16)
    assert p.qo_indptr.tolist() == [0, 2, 3, 19]
    assert p.kv_indptr.tolist() == [0, 2, 3, 5]
    assert p.kv_indices.tolist() == [7, 3, 5, 2, 4]
    assert p.kv_last_page_len.tolist() == [2, 3, 16]
    assert {t.dtype for t in (p.qo_indptr, p.kv_indptr, p.kv_indices, p.kv_last_page_len)} == {torch.int32}
    one = build_paged(np.array([1]), np.array([1]), table[1:2], page_size=1)
    assert (one.kv_indptr.tolist(), one.kv_indices.tolist(), one.kv_last_page_len.tolist()) == ([0, 1], [5], [1])
    with pytest.raises(ValueError, match="pages"):
        build_paged(np.array([1]), np.array([80]), table[:1], page_size=16)
    with pytest.raises(ValueError, match="query_len"):
        build_paged(np.array([3]), np.array([2]), table[:1], page_size=16)


@st.composite
def paged_batches(draw):
    """Sequences with a cached prefix (maybe empty) and 1.. new tokens, blocks scattered over a pool."""
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, 5))
    seqs = []
    for _ in range(n):
        kind = draw(st.sampled_from(["decode", "prefill", "cached_prefill"]))
        cached = 0 if kind == "prefill" else draw(st.integers(1, 40))
        new = 1 if kind == "decode" else draw(st.integers(2, 24))
        seqs.append((cached, new))
    pages = [-(-(c + q) // bs) for c, q in seqs]
    pool = sum(pages) + draw(st.integers(0, 4))
    order = draw(st.permutations(range(pool)))
    tables, at = [], 0
    for p in pages:
        tables.append(list(order[at : at + p]))
        at += p
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    return bs, seqs, tables, pool, hkv, group, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paged_batches())
def test_flashinfer_reference_matches_torch_backend_and_dense_sdpa(case):
    bs, seqs, tables, pool, hkv, group, seed = case
    gen = torch.Generator().manual_seed(seed)
    d, hq = 8, hkv * group
    reqs = [Req(list(range(c + q)), c, t) for (c, q), t in zip(seqs, tables)]
    step = StepInputBuilder(torch.device("cpu"), bs).build(reqs, [q for _, q in seqs])
    total = sum(q for _, q in seqs)
    q, k, v = (torch.randn(total, h, d, generator=gen) for h in (hq, hkv, hkv))
    history = [(torch.randn(c, hkv, d, generator=gen), torch.randn(c, hkv, d, generator=gen)) for c, _ in seqs]
    cache = torch.randn(pool, 2, bs, hkv, d, generator=gen)  # garbage everywhere no sequence owns
    for (c, _), t, (hk, hv) in zip(seqs, tables, history):
        for pos in range(c):
            cache[t[pos // bs], 0, pos % bs], cache[t[pos // bs], 1, pos % bs] = hk[pos], hv[pos]
    outs = {}
    for backend in (FlashInferReference(), TorchAttention()):
        kv = cache.clone()
        meta = backend.prepare(step.attention, torch.device("cpu"))
        outs[backend.name] = backend.forward(q, k, v, kv, meta, d**-0.5)
    row = 0
    for (c, n), (hk, hv) in zip(seqs, history):  # dense: the whole sequence's K/V, causal from its end
        keys, values = torch.cat([hk, k[row : row + n]]), torch.cat([hv, v[row : row + n]])
        mask = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None]
        dense = F.scaled_dot_product_attention(
            q[row : row + n].transpose(0, 1),
            keys.repeat_interleave(group, 1).transpose(0, 1),
            values.repeat_interleave(group, 1).transpose(0, 1),
            attn_mask=mask,
            scale=d**-0.5,
        ).transpose(0, 1)
        for name, out in outs.items():
            torch.testing.assert_close(out[row : row + n], dense, atol=1e-5, rtol=1e-5, msg=name)
        row += n


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 16).flatmap(
        lambda bs: st.tuples(
            st.just(bs),
            st.lists(st.tuples(st.integers(0, 60), st.integers(1, 30), st.booleans()), min_size=1, max_size=6),
        )
    )
)
def test_step_builder_matches_a_per_token_loop(case):
    """Positions, token ids, KV slots and logits rows, against the obvious per-token construction; the builder
    is reused across examples' steps, so stale buffer contents would show."""
    bs, seqs = case
    reqs, news = [], []
    for i, (computed, new, last) in enumerate(seqs):
        total = computed + new + (0 if last else 3)  # not last: a prompt chunk whose logits are not sampled
        blocks = [1000 * i + b for b in range(-(-total // bs))]
        reqs.append(Req([7 * i + t for t in range(total)], computed, blocks))
        news.append(new)
    step = _BUILDER.setdefault(bs, StepInputBuilder(torch.device("cpu"), bs)).build(reqs, news)
    ids, pos, slot_b, slot_o, rows, sampled, row = [], [], [], [], [], [], 0
    for i, (r, n) in enumerate(zip(reqs, news)):
        for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
            ids.append(r.all_token_ids[p])
            pos.append(p)
            slot_b.append(r.block_ids[p // bs])
            slot_o.append(p % bs)
        row += n
        if r.num_computed_tokens + n == r.num_tokens:
            rows.append(row - 1)
            sampled.append(i)
    a = step.attention
    assert step.input_ids.tolist() == ids and step.positions.tolist() == pos
    assert a.slot_blocks.tolist() == slot_b and a.slot_offsets.tolist() == slot_o
    assert step.logits_indices.tolist() == rows and step.sampled == sampled
    assert a.kv_lens.tolist() == [r.num_computed_tokens + n for r, n in zip(reqs, news)]


_BUILDER: dict[int, StepInputBuilder] = {}


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert capture_sizes(128)[-2:] == [112, 128] and len(capture_sizes(128)) == 12


def test_static_decode_padding_touches_only_the_null_block(llama_dir):
    """The same decode steps with and without the static path: equal logits, equal KV in every real block;
    the padding rows wrote the null block (past the pool that transports and the block manager see)."""
    from pdserve.engine.loader import load
    from pdserve.engine.model_runner import ModelRunner

    loaded = load(str(llama_dir), torch.float32, torch.device("cpu"), None)
    runners = [
        ModelRunner(loaded.model, EngineConfig(cuda_graphs=g, max_num_seqs=16), 32, torch.device("cpu"), 256)
        for g in (False, True)
    ]
    assert runners[0].graphs is None and runners[1].graphs is not None
    prompts = [Req([3 + i + t for t in range(5 + 7 * i)], 0, []) for i in range(3)]
    for i, r in enumerate(prompts):
        r.block_ids = [4 * i + b for b in range(4)]
    results = []
    for runner in runners:
        for r in prompts:
            r.num_computed_tokens = 0
        runner.execute(prompts, [r.num_tokens for r in prompts])  # prefill: eager either way
        for r in prompts:
            r.num_computed_tokens = r.num_tokens
            r.all_token_ids.append(11)
        logits, sampled = runner.execute(prompts, [1, 1, 1])  # 3 decodes: padded to 4 when static
        for r in prompts:
            r.all_token_ids.pop()
        results.append((logits, sampled, runner.kv_cache.clone(), runner._kv[runner.null_block].clone()))
    (l0, s0, kv0, null0), (l1, s1, kv1, null1) = results
    assert runners[1].graphs.num_steps == 1 and runners[1].kv_cache.shape[0] == 32
    assert s0 == s1 == [0, 1, 2]
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv1, kv0, atol=1e-5, rtol=1e-5)  # a batch of 4 rows, not 3: matmul rounding
    assert kv1[12:].abs().sum() == 0  # blocks no request owns are untouched
    assert null0.abs().sum() == 0 and null1.abs().sum() > 0
