"""Reference attention in plain torch (CPU and GPU): the CPU path and the oracle for fast backends.

Single-token queries (decode) are grouped by context length (padding within a group stays under
`_PAD_RATIO`) and each group is one padded SDPA call; multi-token queries (prefill chunks) run one SDPA
call per sequence, straight from the new K/V when there is no cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionBatch

_PAD_RATIO = 1.3


@dataclass
class _Prefill:
    start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor | None  # None: no earlier context, attend to the new tokens only
    mask: torch.Tensor | None


@dataclass
class _DecodeGroup:
    rows: torch.Tensor  # token rows of the group's single-token queries
    tables: torch.Tensor  # [n, max_blocks] block ids, padded
    mask: torch.Tensor  # [n, 1, 1, length] True where a key is inside the sequence
    length: int


@dataclass
class TorchMeta:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    decodes: list[_DecodeGroup]
    prefills: list[_Prefill]


class TorchAttention:
    name = "torch"
    graphable = False  # groups and masks depend on the step's lengths

    def prepare(self, batch: AttentionBatch, device: torch.device) -> TorchMeta:
        bs, qlens, kv_lens, table = batch.block_size, batch.query_lens, batch.kv_lens, batch.block_table
        starts = batch.paged.qo_indptr.numpy()[:-1]
        prefills = []
        for i in np.flatnonzero(qlens > 1).tolist():
            start, qlen, clen = int(starts[i]), int(qlens[i]), int(kv_lens[i])
            if clen == qlen:
                prefills.append(_Prefill(start, qlen, clen, None, None))
                continue
            pos = torch.arange(clen - qlen, clen, device=device)
            mask = torch.arange(clen, device=device)[None, :] <= pos[:, None]
            pages = torch.from_numpy(table[i, : -(-clen // bs)]).to(device)
            prefills.append(_Prefill(start, qlen, clen, pages, mask))
        decodes = []
        seqs = np.flatnonzero(qlens == 1)
        seqs = seqs[np.argsort(kv_lens[seqs], kind="stable")]
        while len(seqs):  # groups by length: each group pads to its longest, at most _PAD_RATIO x its shortest
            end = int(np.searchsorted(kv_lens[seqs], kv_lens[seqs[0]] * _PAD_RATIO, side="right"))
            decodes.append(self._decode_group(seqs[:end], starts, kv_lens, table, bs, device))
            seqs = seqs[end:]
        return TorchMeta(batch.slot_blocks, batch.slot_offsets, decodes, prefills)

    @staticmethod
    def _decode_group(seqs, starts, kv_lens, table, bs: int, device) -> _DecodeGroup:
        lens = kv_lens[seqs]
        length = int(lens[-1])
        tables = torch.from_numpy(table[seqs, : -(-length // bs)]).to(device)
        mask = torch.from_numpy(np.arange(length) < lens[:, None]).to(device)[:, None, None, :]
        rows = torch.from_numpy(starts[seqs]).to(device)
        return _DecodeGroup(rows, tables, mask, length)

    def forward(self, q, k, v, kv_layer, meta: TorchMeta, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v
        out = torch.empty_like(q)
        gqa = q.shape[1] != k.shape[1]
        for g in meta.decodes:
            n, length = g.tables.shape[0], g.length
            keys = k_cache[g.tables].flatten(1, 2)[:, :length].transpose(1, 2)
            values = v_cache[g.tables].flatten(1, 2)[:, :length].transpose(1, 2)
            # each KV head's group of query heads becomes the query-length axis: no K/V expansion for GQA
            queries = q[g.rows].view(n, k.shape[1], q.shape[1] // k.shape[1], q.shape[2])
            res = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.mask, scale=scale)
            out[g.rows] = res.reshape(n, q.shape[1], q.shape[2])
        for p in meta.prefills:  # 4-D inputs: CPU SDPA takes its slow math path for 3-D ones
            rows = slice(p.start, p.start + p.query_len)
            queries = q[rows].transpose(0, 1)[None]
            if p.block_table is None:
                keys, values = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
                res = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                keys = k_cache[p.block_table].flatten(0, 1)[: p.context_len].transpose(0, 1)[None]
                values = v_cache[p.block_table].flatten(0, 1)[: p.context_len].transpose(0, 1)[None]
                res = F.scaled_dot_product_attention(
                    queries, keys, values, attn_mask=p.mask, scale=scale, enable_gqa=gqa
                )
            out[rows] = res[0].transpose(0, 1)
        return out
