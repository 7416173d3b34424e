"""Reference attention in plain torch (CPU and GPU): the CPU path and the oracle for fast backends.

Single-token queries (decode) are grouped by context length (padding within a group stays under
`_PAD_RATIO`) and each group is one padded SDPA call; multi-token queries (prefill chunks) run one SDPA
call per sequence, straight from the new K/V when there is no cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def prepare(self, batch: AttentionBatch, device: torch.device) -> TorchMeta:
        bs = batch.block_size
        decode_rows, tables, ctx = [], [], []
        prefills = []
        start = 0
        for qlen, clen, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            if qlen == 1:
                decode_rows.append(start)
                tables.append(table)
                ctx.append(clen)
            elif clen == qlen:
                prefills.append(_Prefill(start, qlen, clen, None, None))
            else:
                pos = torch.arange(clen - qlen, clen, device=device)
                mask = torch.arange(clen, device=device)[None, :] <= pos[:, None]
                nblocks = -(-clen // bs)
                prefills.append(_Prefill(start, qlen, clen, torch.tensor(table[:nblocks], device=device), mask))
            start += qlen
        groups, group = [], []
        for row, table, clen in sorted(zip(decode_rows, tables, ctx), key=lambda d: d[2]):
            if group and clen > group[0][2] * _PAD_RATIO:
                groups.append(group)
                group = []
            group.append((row, table, clen))
        if group:
            groups.append(group)
        decodes = [self._decode_group(g, bs, device) for g in groups]
        return TorchMeta(batch.slot_blocks, batch.slot_offsets, decodes, prefills)

    @staticmethod
    def _decode_group(group, bs: int, device) -> _DecodeGroup:
        length = group[-1][2]
        max_blocks = -(-length // bs)
        tables = [t[: -(-c // bs)] + [0] * (max_blocks - -(-c // bs)) for _, t, c in group]
        lens = torch.tensor([c for _, _, c in group], device=device)
        mask = (torch.arange(length, device=device)[None, :] < lens[:, None])[:, None, None, :]
        rows = torch.tensor([r for r, _, _ in group], device=device)
        return _DecodeGroup(rows, torch.tensor(tables, device=device), mask, length)

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
