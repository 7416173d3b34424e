"""Attention backends behind one interface, chosen by name; backends import their libraries lazily.

Contract: the model runner calls `prepare(batch)` once per step and `forward(...)` once per layer.
`forward` first writes the step's new K/V into the paged cache at each token's slot, then attends each
query token to its sequence's cached context (causally). The cache belongs to the runner; a backend
never allocates, frees or keeps references to blocks between steps.

Backends: `torch` (the reference and CPU path), `flashinfer_reference` (plain torch over FlashInfer's paged
format, the oracle for the kernels; CPU or GPU) and `flashinfer` (the kernels; CUDA). The KV layout they all
read is the runner's block-major cache: one layer's view `[num_blocks, 2, block_size, num_kv_heads, head_dim]`
has a page stride of every layer's bytes, which FlashInfer's paged kernels accept (strided paged KV since 0.2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pdserve.engine.attention.paged import PagedKV

log = logging.getLogger(__name__)

# `auto` picks FlashInfer on CUDA only once bench/gpu_check.py has verified it against flashinfer_reference on
# a GPU. No GPU run has been made yet, so `auto` means torch everywhere.
FLASHINFER_VERIFIED = False


@dataclass
class AttentionBatch:
    """A step's layout, built by the step-input builder. Token rows are grouped by sequence, in order; numpy
    arrays are on the host (for planning), tensors on the model's device."""

    query_lens: np.ndarray  # [num_seqs] new tokens per sequence this step
    kv_lens: np.ndarray  # [num_seqs] tokens in the cache per sequence after this step (incl. the new ones)
    block_table: np.ndarray  # [num_seqs, >= pages] int32 block ids of each sequence, padded past its last
    slot_blocks: torch.Tensor  # [num_tokens] block id of each new token's slot
    slot_offsets: torch.Tensor  # [num_tokens] offset inside that block
    block_size: int
    paged: PagedKV  # the same pages in FlashInfer's format (host int32 tensors)


class AttentionBackend(Protocol):
    name: str
    graphable: bool  # whether a decode step's forward can be captured in a CUDA graph after prepare

    def prepare(self, batch: AttentionBatch, device: torch.device) -> object:
        """Per-step precomputation shared by every layer (index tensors, planned kernels)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: object, scale: float
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], kv_layer [num_blocks, 2, block_size, Hkv, D] -> [T, Hq, D]."""


BACKENDS = ("auto", "torch", "flashinfer_reference", "flashinfer")


def get_backend(name: str, device: torch.device, spec, dtype: torch.dtype, block_size: int) -> AttentionBackend:
    """`spec` gives the heads (num_heads, num_kv_heads, head_dim), as models.llama.ModelSpec does."""
    chosen = name
    if name == "auto":
        fast = device.type == "cuda" and FLASHINFER_VERIFIED and _has_flashinfer()
        chosen = "flashinfer" if fast else "torch"
    if chosen == "torch":
        from pdserve.engine.attention.torch_backend import TorchAttention

        backend = TorchAttention()
    elif chosen == "flashinfer_reference":
        from pdserve.engine.attention.flashinfer_reference import FlashInferReference

        backend = FlashInferReference()
    elif chosen == "flashinfer":
        if device.type != "cuda" or not _has_flashinfer():
            raise ValueError("attention_backend 'flashinfer' needs a CUDA device and the flashinfer package")
        from pdserve.engine.attention.flashinfer_backend import FlashInferAttention

        backend = FlashInferAttention(device, spec, dtype, block_size)
    else:
        raise ValueError(f"unknown attention_backend {name!r}; choose one of {', '.join(BACKENDS)}")
    why = ""
    if name == "auto" and device.type == "cuda" and chosen == "torch":
        why = " (flashinfer is not installed)" if FLASHINFER_VERIFIED else " (FlashInfer not yet verified on a GPU)"
    log.info("attention backend: %s (asked for %r on %s)%s", backend.name, name, device, why)
    return backend


def _has_flashinfer() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None
