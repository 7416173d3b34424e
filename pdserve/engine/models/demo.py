"""The embedded default: a small deterministic random-weight Llama with a byte-level tokenizer.

It needs no download, so `pdserve generate` and `pdserve serve` work on a fresh machine. Its output is
random printable ASCII (the output head favours those bytes); it is a demo, not a language model.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map used by byte-level BPE (GPT-2's convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def demo_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=256 + len(SPECIAL_TOKENS),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        dtype="float32",
    )


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


def demo_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", chat_template=CHAT_TEMPLATE
    )


def write_demo_model(path: str) -> None:
    """Write the demo model as a Hugging Face directory that `LLM(model=path)` and transformers load."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config()
    config.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in demo_state_dict(config).items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    demo_tokenizer().save_pretrained(out)
