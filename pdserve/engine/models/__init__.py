"""Supported architectures: a Hugging Face config becomes a `ModelSpec` plus RoPE frequencies."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pdserve.engine.models.llama import LlamaForCausalLM, ModelSpec
from pdserve.model_info import SUPPORTED_ARCHITECTURES


def spec_from_config(config) -> ModelSpec:
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; pdserve supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return ModelSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        qkv_bias=True if arch == "Qwen2ForCausalLM" else attention_bias,
        o_bias=False if arch == "Qwen2ForCausalLM" else attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin scaling, computed as transformers does (its functions for scaled RoPE)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' is not supported (its frequencies change with sequence length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq, float(scaling)


def build_model(config, dtype: torch.dtype, device: torch.device, max_positions: int, tp=None) -> LlamaForCausalLM:
    """`tp`: a parallel.TPShard; the model is then the rank's part (its heads, MLP columns, vocabulary rows)."""
    spec = spec_from_config(config)
    inv_freq, scaling = rope_frequencies(config, spec.head_dim)
    parallel = None
    if tp is not None and tp.size > 1:
        from pdserve.engine.parallel import head_split, local_spec

        split = head_split(spec, tp.size, tp.rank)
        spec, parallel = local_spec(spec, split), (tp, split.vocab_start, spec.vocab_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, parallel).to(dtype=dtype)  # no memory yet: the parameters are allocated once,
    model = model.to_empty(device=device).eval()  # in the target dtype on the device (no float32 copy to cast)
    model.set_rope(inv_freq, scaling, max_positions)
    return model


def load_state(model: LlamaForCausalLM, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model; missing or misshapen weights are errors naming the key.
    `tensors` may read each tensor when indexed (see loader.SafetensorsWeights): one is held at a time."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(
            f"checkpoint is missing weights: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    with torch.no_grad():
        for name, param in params.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(param.shape):
                raise ValueError(f"weight {name} has shape {tuple(src.shape)}, expected {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))
