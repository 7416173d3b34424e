"""Attention backends behind one interface, chosen by name; backends import their libraries lazily.

Contract: the model runner calls `prepare(batch)` once per step and `forward(...)` once per layer.
`forward` first writes the step's new K/V into the paged cache at each token's slot, then attends each
query token to its sequence's cached context (causally). The cache belongs to the runner; a backend
never allocates, frees or keeps references to blocks between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionBatch:
    """A step's layout, built by the model runner. Token rows are grouped by sequence, in order."""

    query_lens: list[int]  # new tokens per sequence this step
    context_lens: list[int]  # tokens in the cache per sequence after this step (incl. the new ones)
    block_tables: list[list[int]]  # per sequence, its block ids covering context_lens
    slot_blocks: torch.Tensor  # [num_tokens] block id of each new token's slot
    slot_offsets: torch.Tensor  # [num_tokens] offset inside that block
    block_size: int


class AttentionBackend(Protocol):
    name: str

    def prepare(self, batch: AttentionBatch, device: torch.device) -> object:
        """Per-step precomputation shared by every layer (index tensors, planned kernels)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: object, scale: float
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], kv_layer [num_blocks, 2, block_size, Hkv, D] -> [T, Hq, D]."""


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        name = "torch"  # becomes FlashInfer on CUDA once that backend lands
    if name == "torch":
        from pdserve.engine.attention.torch_backend import TorchAttention

        return TorchAttention()
    if name == "flashinfer":
        if device.type != "cuda" or not _has_flashinfer():
            raise ValueError("attention_backend 'flashinfer' needs a CUDA device and the flashinfer package")
        raise ValueError("attention_backend 'flashinfer' is not implemented yet; use 'torch'")
    raise ValueError(f"unknown attention_backend {name!r}; choose 'auto', 'torch' or 'flashinfer'")


def _has_flashinfer() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None
