"""Owns the model and the paged KV cache; turns a scheduled batch into one forward pass.

KV cache layout: one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], block-major,
so a block's KV for every layer is one contiguous span of memory: a handoff moves one region per block.
"""

from __future__ import annotations

import torch

from pdserve.config import EngineConfig
from pdserve.engine.attention import AttentionBatch, get_backend
from pdserve.engine.loader import torch_dtype
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.sequence import Request

_DEFAULT_CPU_KV_BYTES = 512 << 20
_GPU_KV_FRACTION = 0.85


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    s = model.spec
    return s.num_layers * 2 * block_size * s.num_kv_heads * s.head_dim * torch.tensor([], dtype=dtype).element_size()


def num_kv_blocks(config: EngineConfig, model: LlamaForCausalLM, max_model_len: int, device: torch.device) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_block_bytes(model, config.block_size, torch_dtype(config.dtype))
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
    elif device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * _GPU_KV_FRACTION)
    else:
        enough = config.max_num_seqs * -(-max_model_len // config.block_size) * per_block
        budget = min(_DEFAULT_CPU_KV_BYTES, enough)
    blocks = budget // per_block
    if blocks < 2:
        raise ValueError(f"a KV cache budget of {budget} bytes holds fewer than 2 blocks of {per_block} bytes")
    return blocks


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, num_blocks: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.block_size = config.block_size
        self.backend = get_backend(config.attention_backend, device)
        s = model.spec
        shape = (num_blocks, s.num_layers, 2, config.block_size, s.num_kv_heads, s.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=torch_dtype(config.dtype), device=device)

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Run one step; returns logits for the requests whose last token was computed, and their indices."""
        bs = self.block_size
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
        dev = self.device
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        batch = AttentionBatch(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=dev),
            slot_offsets=pos_t % bs,
            block_size=bs,
        )
        meta = self.backend.prepare(batch, dev)
        logits = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            pos_t,
            self.kv_cache,
            self.backend,
            meta,
            torch.tensor(logits_rows, dtype=torch.long, device=dev),  # may be empty: a step of prefill chunks only
        )
        return logits, sampled
