"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a flat token batch and a paged KV cache.

Parameter names match Hugging Face's, so a checkpoint's state dict loads as is. Architecture differences
are flags in `ModelSpec`: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings.
Under tensor parallelism (`tp`, see engine/parallel.py) the spec is the rank's own: its heads, MLP columns and
vocabulary rows; o/down outputs are all-reduced, the embedding is masked and all-reduced, logits gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import AttentionBackend


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, tp=None) -> None:
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm

    def forward(self, x, cos, sin, kv_cache, backend: AttentionBackend, meta) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = backend.forward(q, k, v, kv_cache[:, self.layer_idx], meta, self.scale)
        out = self.o_proj(out.reshape(n, self.num_heads * self.head_dim))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, tp=None) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer_idx, tp)
        self.mlp = MLP(spec, tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, backend, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, backend, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec, tp=None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, tp) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], ...) -> logits [len(logits_indices), vocab].

    `tp`: None, or (tp, vocab_start, vocab_size): the rank's group, the first vocabulary row it holds, and the
    full vocabulary size (the logits' width once gathered)."""

    def __init__(self, spec: ModelSpec, tp=None) -> None:
        super().__init__()
        self.spec = spec
        self.tp, self.vocab_start, self.full_vocab = tp if tp is not None else (None, 0, spec.vocab_size)
        self.model = Backbone(spec, self.tp)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.cos_cache = self.sin_cache = None

    def set_rope(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int) -> None:
        """cos/sin per position, computed in float32 as transformers does (position * inv_freq)."""
        device = self.model.embed_tokens.weight.device
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cache = (emb.cos() * attention_scaling).to(device)
        self.sin_cache = (emb.sin() * attention_scaling).to(device)

    def lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, positions, kv_cache, backend, meta, logits_indices) -> torch.Tensor:
        x = self._embed(input_ids)
        cos = self.cos_cache[positions].to(x.dtype)[:, None, :]
        sin = self.sin_cache[positions].to(x.dtype)[:, None, :]
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv_cache, backend, meta)
        x = self.model.norm(x[logits_indices])
        logits = F.linear(x, self.lm_weight())
        if self.tp is None:
            return logits
        return self.tp.all_gather_last(logits)[:, : self.full_vocab]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(input_ids)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.spec.vocab_size)
        x = self.model.embed_tokens(local.clamp(0, self.spec.vocab_size - 1)) * mine[:, None]
        return self.tp.all_reduce(x)
