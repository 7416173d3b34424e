"""Reference attention in plain torch (CPU and GPU): the CPU path and the oracle for fast backends.

Single-token queries (decode) are batched into one padded SDPA call; multi-token queries (prefill
chunks) run one SDPA call per sequence, straight from the new K/V when there is no cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionBatch


@dataclass
class _Prefill:
    start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor | None  # None: no earlier context, attend to the new tokens only
    mask: torch.Tensor | None


@dataclass
class TorchMeta:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    decode_len: int
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
        meta = TorchMeta(batch.slot_blocks, batch.slot_offsets, None, None, None, 0, prefills)
        if decode_rows:
            max_blocks = max(-(-c // bs) for c in ctx)
            padded = [t[: -(-c // bs)] + [0] * (max_blocks - -(-c // bs)) for t, c in zip(tables, ctx)]
            meta.decode_rows = torch.tensor(decode_rows, device=device)
            meta.decode_tables = torch.tensor(padded, device=device)
            meta.decode_len = max(ctx)
            lens = torch.tensor(ctx, device=device)
            meta.decode_mask = (torch.arange(meta.decode_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return meta

    def forward(self, q, k, v, kv_layer, meta: TorchMeta, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v
        out = torch.empty_like(q)
        gqa = q.shape[1] != k.shape[1]
        if meta.decode_rows is not None:
            n, length = meta.decode_tables.shape[0], meta.decode_len
            keys = k_cache[meta.decode_tables].flatten(1, 2)[:, :length].transpose(1, 2)
            values = v_cache[meta.decode_tables].flatten(1, 2)[:, :length].transpose(1, 2)
            # each KV head's group of query heads becomes the query-length axis: no K/V expansion for GQA
            queries = q[meta.decode_rows].view(n, k.shape[1], q.shape[1] // k.shape[1], q.shape[2])
            res = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.decode_mask, scale=scale)
            out[meta.decode_rows] = res.reshape(n, q.shape[1], q.shape[2])
        for p in meta.prefills:
            rows = slice(p.start, p.start + p.query_len)
            queries = q[rows].transpose(0, 1)
            if p.block_table is None:
                keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                res = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                keys = k_cache[p.block_table].flatten(0, 1)[: p.context_len].transpose(0, 1)
                values = v_cache[p.block_table].flatten(0, 1)[: p.context_len].transpose(0, 1)
                res = F.scaled_dot_product_attention(queries, keys, values, attn_mask=p.mask, scale=scale, enable_gqa=gqa)
            out[rows] = res.transpose(0, 1)
        return out
