"""Host time to build one step's inputs (token ids, positions, KV slots, logits rows, and the torch backend's
per-step metadata) at batch 1, 64 and 256: the per-token Python lists of 838f251 (copied below as `legacy`)
against the vectorised builder (`pdserve.engine.step_inputs`), side by side in one run. CPU only, no model.

Steps: `decode` (one new token per sequence, 1024 tokens of context) and `chunk` (32 new tokens per sequence
on a 512-token cached prefix). Prints a table with the ratio and writes JSON.

    python bench/step_inputs.py [--repeats 200] [--name step_inputs]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import print_table, write_json
from pdserve.engine.attention import AttentionBatch
from pdserve.engine.attention.torch_backend import TorchAttention
from pdserve.engine.step_inputs import StepInputBuilder

BLOCK = 16


class Req:
    def __init__(self, tokens, computed, blocks):
        self.all_token_ids, self.num_computed_tokens, self.block_ids = tokens, computed, blocks
        self.num_tokens = len(tokens)


def make_step(kind: str, batch: int):
    reqs, news = [], []
    for i in range(batch):
        computed, new = (1023, 1) if kind == "decode" else (512, 32)
        total = computed + new
        blocks = list(range(i * 80, i * 80 + -(-total // BLOCK)))
        reqs.append(Req(list(range(total)), computed, blocks))
        news.append(new)
    return reqs, news


def legacy(requests, num_new_tokens, device):
    """ModelRunner.execute's input building and TorchAttention.prepare as at 838f251 (per token / per block)."""
    bs = BLOCK
    ids, positions, slot_blocks, logits_rows, sampled = [], [], [], [], []
    query_lens, context_lens, tables = [], [], []
    row = 0
    for i, (req, n) in enumerate(zip(requests, num_new_tokens)):
        start = req.num_computed_tokens
        ids += req.all_token_ids[start : start + n]
        pos = range(start, start + n)
        positions += pos
        slot_blocks += [req.block_ids[p // bs] for p in pos]
        query_lens.append(n)
        context_lens.append(start + n)
        tables.append(req.block_ids)
        row += n
        if start + n == req.num_tokens:
            logits_rows.append(row - 1)
            sampled.append(i)
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    tensors = (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(slot_blocks, dtype=torch.long, device=device),
        pos_t % bs,
        torch.tensor(logits_rows, dtype=torch.long, device=device),
    )
    # the old TorchAttention.prepare: python lists per sequence and per block
    decode_rows, dtables, ctx, prefills, start = [], [], [], [], 0
    for qlen, clen, table in zip(query_lens, context_lens, tables):
        if qlen == 1:
            decode_rows.append(start)
            dtables.append(table)
            ctx.append(clen)
        elif clen != qlen:
            p = torch.arange(clen - qlen, clen, device=device)
            mask = torch.arange(clen, device=device)[None, :] <= p[:, None]
            prefills.append((torch.tensor(table[: -(-clen // bs)], device=device), mask))
        start += qlen
    groups, group = [], []
    for r, table, clen in sorted(zip(decode_rows, dtables, ctx), key=lambda d: d[2]):
        if group and clen > group[0][2] * 1.3:
            groups.append(group)
            group = []
        group.append((r, table, clen))
    if group:
        groups.append(group)
    for g in groups:
        length = g[-1][2]
        mb = -(-length // bs)
        padded = [t[: -(-c // bs)] + [0] * (mb - -(-c // bs)) for _, t, c in g]
        lens = torch.tensor([c for _, _, c in g], device=device)
        _ = (torch.arange(length, device=device)[None, :] < lens[:, None])[:, None, None, :]
        _ = torch.tensor([r for r, _, _ in g], device=device), torch.tensor(padded, device=device)
    return tensors, sampled


def vectorised(builder: StepInputBuilder, backend: TorchAttention, requests, news, device):
    step = builder.build(requests, news)
    batch: AttentionBatch = step.attention
    return step, backend.prepare(batch, device)


def timed(repeats: int, fn, *args) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(3):  # best of 3 rounds: this machine is noisy
        t = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--name", default="step_inputs", help="JSON goes to bench/results/<name>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    builder, backend, rows = StepInputBuilder(cpu, BLOCK), TorchAttention(), []
    for kind in ("decode", "chunk"):
        for batch in (1, 64, 256):
            reqs, news = make_step(kind, batch)
            step, _ = vectorised(builder, backend, reqs, news, cpu)  # same answer as the legacy path
            (ids, slots, offs, logit_rows), sampled = legacy(reqs, news, cpu)
            assert torch.equal(step.input_ids, ids) and torch.equal(step.attention.slot_blocks, slots)
            assert torch.equal(step.attention.slot_offsets, offs) and step.sampled == sampled
            assert np.array_equal(step.logits_indices.numpy(), logit_rows.numpy())
            reps = max(5, args.repeats // max(1, batch // 16))
            before = timed(reps, legacy, reqs, news, cpu)
            after = timed(reps, vectorised, builder, backend, reqs, news, cpu)
            rows.append(
                {
                    "step": kind,
                    "batch": batch,
                    "tokens": sum(news),
                    "before_us": round(before * 1e6, 1),
                    "after_us": round(after * 1e6, 1),
                    "before/after": round(before / after, 2),
                }
            )
    print_table(rows, list(rows[0]))
    print(write_json(args.name, {"block_size": BLOCK, "torch_threads": 1, "rows": rows}))


if __name__ == "__main__":
    main()
