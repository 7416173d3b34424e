"""The embedded default's weights: a small deterministic random-weight Llama (its config and byte-level
tokenizer are `pdserve/demo_model.py`'s, which the torch-free frontend loads).

It needs no download, so `pdserve generate` and `pdserve serve` work on a fresh machine. Its output is
random printable ASCII (the output head favours those bytes); it is a demo, not a language model.
"""

from __future__ import annotations

from pdserve.demo_model import demo_config, demo_tokenizer


def demo_state_dict(config) -> dict:
    import torch

    from pdserve.engine.models import spec_from_config
    from pdserve.engine.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(spec_from_config(config)).named_parameters()}
    gen = torch.Generator().manual_seed(1234)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        elif name.endswith("embed_tokens.weight"):
            state[name] = torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    printable = torch.zeros(config.vocab_size, dtype=torch.bool)
    printable[ord(" ") : ord("~") + 1] = True
    state["lm_head.weight"][~printable] = 0.0  # only printable ASCII gets a non-zero logit
    state["lm_head.weight"] *= 4.0
    return state


def write_demo_model(path: str) -> None:
    """Write the demo model as a Hugging Face directory that `LLM(model=path)` and transformers load."""
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config()
    LlamaConfig(**config.to_dict()).save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in demo_state_dict(config).items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    demo_tokenizer().save_pretrained(out)
