"""FlashInfer's paged attention in plain torch: reads exactly the `PagedKV` tables the kernels read, with their
semantics (page-table gather, causal mask aligned to the end of each sequence's KV, query head h reading KV
head h // (Hq / Hkv)), in float32. Slow and simple: the oracle for the `flashinfer` backend, on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionBatch
from pdserve.engine.attention.paged import PagedKV


@dataclass
class ReferenceMeta:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    paged: PagedKV  # on the device
    seqs: list[tuple[int, int, int, int, int]]  # per sequence: qo start, qo end, first page, end page, kv len


class FlashInferReference:
    name = "flashinfer_reference"
    graphable = False

    def prepare(self, batch: AttentionBatch, device: torch.device) -> ReferenceMeta:
        p = batch.paged
        qo, kv, last = p.qo_indptr.tolist(), p.kv_indptr.tolist(), p.kv_last_page_len.tolist()
        seqs = [
            (qo[i], qo[i + 1], kv[i], kv[i + 1], (kv[i + 1] - kv[i] - 1) * p.page_size + last[i])
            for i in range(p.num_seqs)
        ]
        return ReferenceMeta(batch.slot_blocks, batch.slot_offsets, p.to(device), seqs)

    def forward(self, q, k, v, kv_layer, meta: ReferenceMeta, scale: float) -> torch.Tensor:
        kv_layer[:, 0][meta.slot_blocks, meta.slot_offsets] = k
        kv_layer[:, 1][meta.slot_blocks, meta.slot_offsets] = v
        return paged_attention(q, kv_layer, meta.paged, meta.seqs, scale)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, paged: PagedKV, seqs, scale: float) -> torch.Tensor:
    """q [T, Hq, D] against the pages of `kv_layer` [pages, 2, page_size, Hkv, D] that `paged` lists."""
    hq, hkv = q.shape[1], kv_layer.shape[3]
    kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
    out = torch.empty_like(q)
    for qs, qe, ps, pe, kv_len in seqs:
        pages = kv_layer[paged.kv_indices[ps:pe].long()]  # [n, 2, page_size, Hkv, D]
        keys = pages[:, 0].flatten(0, 1)[:kv_len, kv_head].float()  # [kv_len, Hq, D]
        values = pages[:, 1].flatten(0, 1)[:kv_len, kv_head].float()
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), keys) * scale
        qpos = torch.arange(kv_len - (qe - qs), kv_len, device=q.device)  # queries are the KV's last tokens
        causal = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out
