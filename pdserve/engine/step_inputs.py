"""A step's model inputs, built in persistent host buffers (pinned on CUDA) by vectorised numpy and copied to
the device once per step. Python touches each request once (a slice of its tokens, its block list), never a
token: positions, KV slots, page tables and logits rows are array arithmetic over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.attention import AttentionBatch
from pdserve.engine.attention.paged import build_paged


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] on the device
    positions: torch.Tensor  # [T]
    logits_indices: torch.Tensor  # [len(sampled)] token rows whose logits are sampled
    sampled: list[int]  # indices into the step's requests, in logits order
    attention: AttentionBatch


class StepInputBuilder:
    """Owns the host buffers; `build` reuses them, growing them when a step is larger than any before.

    The per-token arrays and the logits rows go into one int64 staging buffer (pinned on CUDA), so a step's
    inputs reach the device in one copy. The buffers are rewritten by the next `build`: a step's inputs are
    read only during its own forward pass."""

    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device = device
        self.block_size = block_size
        self._pinned = device.type == "cuda"
        self._tokens = self._seqs = self._blocks = 0
        self._copied = None  # CUDA event: the last step's copy out of the staging buffer is done
        self._table = np.zeros((0, 0), dtype=np.int32)  # block ids per sequence; read on the host only

    def _reserve(self, tokens: int, seqs: int, blocks: int) -> None:
        if tokens > self._tokens or seqs > self._seqs:
            self._tokens, self._seqs = max(tokens, 2 * self._tokens), max(seqs, 2 * self._seqs)
            size = 4 * self._tokens + self._seqs
            self._stage = torch.zeros(size, dtype=torch.int64, pin_memory=self._pinned).numpy()
            self._arange = np.arange(self._tokens)
            self._lens = np.zeros((3, self._seqs), dtype=np.int64)  # starts, query lens, total tokens
        rows, cols = self._table.shape
        if seqs > rows or blocks > cols:
            self._table = np.zeros((max(seqs, self._seqs), max(blocks, 2 * cols)), dtype=np.int32)

    def build(self, requests, num_new_tokens: list[int]) -> StepInputs:
        n, total = len(requests), sum(num_new_tokens)
        if self._copied is not None:
            self._copied.synchronize()
        self._reserve(total, n, max((len(r.block_ids) for r in requests), default=1))
        starts, qlens, ntok = self._lens[0, :n], self._lens[1, :n], self._lens[2, :n]
        stage, table, row = self._stage, self._table, 0
        for i, (req, q) in enumerate(zip(requests, num_new_tokens)):
            s = req.num_computed_tokens
            starts[i], qlens[i], ntok[i] = s, q, req.num_tokens
            stage[row : row + q] = req.all_token_ids[s : s + q]
            table[i, : len(req.block_ids)] = req.block_ids
            row += q
        kv_lens = starts + qlens
        paged = build_paged(qlens, kv_lens, table[:n], self.block_size)
        offsets = paged.qo_indptr.numpy()[:-1].astype(np.int64)
        sampled = np.flatnonzero(kv_lens == ntok)
        m = len(sampled)
        positions, slot_blocks, slot_offsets = (stage[k * total : (k + 1) * total] for k in (1, 2, 3))
        np.subtract(self._arange[:total], np.repeat(offsets - starts, qlens), out=positions)
        slot_blocks[:] = table[np.repeat(np.arange(n), qlens), positions // self.block_size]
        np.remainder(positions, self.block_size, out=slot_offsets)
        np.add(offsets[sampled], qlens[sampled] - 1, out=stage[4 * total : 4 * total + m])
        dev = self._to_device(stage[: 4 * total + m])
        batch = AttentionBatch(
            query_lens=qlens.copy(),
            kv_lens=kv_lens,
            block_table=table[:n],
            slot_blocks=dev[2 * total : 3 * total],
            slot_offsets=dev[3 * total : 4 * total],
            block_size=self.block_size,
            paged=paged,
        )
        return StepInputs(dev[:total], dev[total : 2 * total], dev[4 * total :], sampled.tolist(), batch)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cpu":
            return t
        t = t.to(self.device, non_blocking=self._pinned)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return t
