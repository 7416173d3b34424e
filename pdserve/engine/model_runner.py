"""Owns the model and the paged KV cache; turns a scheduled batch into one forward pass.

KV cache layout: one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], block-major,
so a block's KV for every layer is one contiguous span of memory: a handoff moves one region per block.
"""

from __future__ import annotations

import torch

from pdserve.config import EngineConfig
from pdserve.engine.attention import get_backend
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.loader import torch_dtype
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.sequence import Request
from pdserve.engine.step_inputs import StepInputBuilder, StepInputs

_DEFAULT_CPU_KV_BYTES = 512 << 20


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
        budget = _profiled_gpu_budget(config, model, max_model_len, device)
    else:
        enough = config.max_num_seqs * -(-max_model_len // config.block_size) * per_block
        budget = min(_DEFAULT_CPU_KV_BYTES, enough)
    blocks = budget // per_block
    if blocks < 2:
        raise ValueError(f"a KV cache budget of {budget} bytes holds fewer than 2 blocks of {per_block} bytes")
    return blocks


def gpu_kv_budget(total: int, free: int, activation_peak: int, utilization: float) -> int:
    """KV bytes on a GPU: `utilization` of its `total` memory, less what is in use once the weights are loaded and
    the allocator's cache is released (`total - free`: weights, the CUDA context, any other process), less the
    largest step's activations (`activation_peak`, measured)."""
    return int(total * utilization) - (total - free) - activation_peak


def profile_step(
    model: LlamaForCausalLM, config: EngineConfig, max_model_len: int, device: torch.device
) -> tuple[int, int]:
    """Run the largest step this engine can schedule, on a throwaway KV cache just big enough: a full token
    budget (`max_num_batched_tokens`, within the context length) over as many sequences as may produce logits.
    Returns (tokens computed, logits rows)."""
    n = min(config.max_num_batched_tokens, max_model_len * config.max_num_seqs)
    seqs = min(config.max_num_seqs, n)
    lens = [n // seqs + (i < n % seqs) for i in range(seqs)]  # each within max_model_len, as n is
    bs, reqs, first = config.block_size, [], 0
    for length in lens:
        nb = -(-length // bs)
        reqs.append(_ProfileRequest(length, list(range(first, first + nb))))
        first += nb
    logits, _ = ModelRunner(model, config, first, device).execute(reqs, lens)
    return sum(lens), logits.shape[0]


class _ProfileRequest:
    """The fields of a Request that ModelRunner.execute reads: a whole prompt of token 0, not yet computed."""

    def __init__(self, length: int, block_ids: list[int]) -> None:
        self.num_computed_tokens, self.num_tokens, self.block_ids = 0, length, block_ids
        self.all_token_ids = [0] * length


def _profiled_gpu_budget(config: EngineConfig, model: LlamaForCausalLM, max_model_len: int, device) -> int:
    torch.cuda.empty_cache()  # cached (freed) blocks count as used in mem_get_info
    free, total = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile_step(model, config, max_model_len, device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return gpu_kv_budget(total, free, peak, config.gpu_memory_utilization)


class ModelRunner:
    """`kv_cache` is the pool the block manager hands out (`num_blocks` blocks, what transports move); the
    tensor the model writes is one block longer: the last block is the null block that padding rows of a
    static-shape (CUDA graph) decode step write to and read, and no request ever owns."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        num_blocks: int,
        device: torch.device,
        max_model_len: int | None = None,  # None: no static decode path (a profile step's throwaway runner)
        ranks=None,  # tensor_parallel.Ranks on rank 0 of a tensor-parallel engine: each step goes to the others
    ) -> None:
        self.model = model
        self.ranks = ranks
        self.device = device
        self.block_size = config.block_size
        dtype = torch_dtype(config.dtype)
        self.backend = get_backend(config.attention_backend, device, model.spec, dtype, config.block_size)
        s = model.spec
        shape = (num_blocks + 1, s.num_layers, 2, config.block_size, s.num_kv_heads, s.head_dim)
        self._kv = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_cache = self._kv[:num_blocks]
        self.null_block = num_blocks
        self.inputs = StepInputBuilder(device, config.block_size)
        self.graphs = DecodeGraphs.create(self, config, max_model_len)

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Run one step; returns logits for the requests whose last token was computed, and their indices."""
        if self.ranks is None:
            return self._execute(requests, num_new_tokens)
        try:
            self.ranks.send_step(requests, num_new_tokens)
            return self._execute(requests, num_new_tokens)
        except RuntimeError as e:  # a collective with a dead or stuck rank: this engine is broken
            raise RuntimeError(f"tensor-parallel step failed (a rank died or hung): {e}") from e

    def _execute(self, requests, num_new_tokens):
        if self.graphs is not None and self.graphs.fits(requests, num_new_tokens):
            return self.graphs.run(requests)
        step = self.inputs.build(requests, num_new_tokens)
        return self.forward(step), step.sampled

    def forward(self, step: StepInputs) -> torch.Tensor:
        meta = self.backend.prepare(step.attention, self.device)
        # logits_indices may be empty: a step of prefill chunks only
        return self.model(step.input_ids, step.positions, self._kv, self.backend, meta, step.logits_indices)
