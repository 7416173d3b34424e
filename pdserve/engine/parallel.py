"""Tensor parallelism's shapes: which heads, MLP columns and vocabulary rows each rank holds, and the slice of
each checkpoint tensor that gives them (so a rank reads only its part of the weights).

Query heads split evenly. KV heads split evenly when there are at least as many as ranks, else each is
replicated on `size / num_kv_heads` consecutive ranks (a rank's query heads always read KV heads it holds).
Column-parallel: q/k/v (by heads), gate/up; row-parallel, followed by an all-reduce: o and down (their biases
live on rank 0 only, so the sum adds them once). The embedding and LM head split the vocabulary, padded up to a
multiple of the degree; logits are gathered and the padding dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.engine.models.llama import ModelSpec


class TPShard(Protocol):
    """A rank of a tensor-parallel group: what the loader slices by and the model's layers call."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; returns x."""

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x concatenated along the last dimension, in rank order."""


@dataclass(frozen=True)
class HeadSplit:
    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int
    vocab_start: int
    vocab_rows: int  # this rank's rows of the padded vocabulary
    mlp_start: int
    mlp_cols: int


def check_degree(spec: ModelSpec, size: int) -> None:
    """A config error naming what does not divide."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if spec.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {spec.num_heads} attention heads")
    kv = spec.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(f"tensor_parallel_size {size} and the model's {kv} KV heads: neither divides the other")
    if spec.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide intermediate_size {spec.intermediate_size}")


def head_split(spec: ModelSpec, size: int, rank: int) -> HeadSplit:
    check_degree(spec, size)
    nq = spec.num_heads // size
    if spec.num_kv_heads >= size:
        nkv = spec.num_kv_heads // size
        kv_start = rank * nkv
    else:
        nkv, kv_start = 1, rank // (size // spec.num_kv_heads)
    rows = -(-spec.vocab_size // size)
    cols = spec.intermediate_size // size
    return HeadSplit(rank * nq, nq, kv_start, nkv, rank * rows, rows, rank * cols, cols)


def local_spec(spec: ModelSpec, split: HeadSplit) -> ModelSpec:
    """The shapes one rank builds: its heads, MLP columns and vocabulary rows."""
    return dataclasses.replace(
        spec,
        num_heads=split.num_heads,
        num_kv_heads=split.num_kv_heads,
        intermediate_size=split.mlp_cols,
        vocab_size=split.vocab_rows,
    )


def shard_tensor(name: str, full, shape: tuple[int, ...], spec: ModelSpec, split: HeadSplit, rank: int):
    """This rank's part of checkpoint tensor `name`. `full` is indexable by slices (a tensor, or safetensors'
    lazy slice, which reads only what is indexed); `shape` is its full shape. Returns a tensor."""
    d = spec.head_dim
    part = name.rsplit(".", 2)[-2] if "." in name else name
    if part == "q_proj":
        return full[split.q_start * d : (split.q_start + split.num_heads) * d]
    if part in ("k_proj", "v_proj"):
        return full[split.kv_start * d : (split.kv_start + split.num_kv_heads) * d]
    if part in ("gate_proj", "up_proj"):
        return full[split.mlp_start : split.mlp_start + split.mlp_cols]
    if part in ("o_proj", "down_proj"):
        if name.endswith(".bias"):  # added once: on rank 0, before the all-reduce
            t = full[:]
            return t if rank == 0 else torch.zeros_like(t)
        start, width = (
            (split.q_start * d, split.num_heads * d) if part == "o_proj" else (split.mlp_start, split.mlp_cols)
        )
        return full[:, start : start + width]
    if part in ("embed_tokens", "lm_head"):
        stop = min(split.vocab_start + split.vocab_rows, shape[0])
        rows = full[split.vocab_start : stop] if stop > split.vocab_start else full[0:0]
        pad = split.vocab_rows - rows.shape[0]
        return torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))]) if pad else rows
    return full[:]
