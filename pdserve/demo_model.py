"""The embedded demo model's config and byte-level tokenizer, without torch (the frontend serves it too).

Its weights are `pdserve/engine/models/demo.py`'s. The config is a plain record of the Hugging Face fields,
not a transformers `LlamaConfig`: transformers' config classes import torch (5.x: `configuration_utils`
imports `modeling_rope_utils`, which imports torch when it is installed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class DemoConfig:
    """What `LlamaConfig(**asdict(self))` holds for the fields pdserve reads (`pdserve make-model` writes it so)."""

    architectures: tuple[str, ...] = ("LlamaForCausalLM",)
    vocab_size: int = 256 + len(SPECIAL_TOKENS)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 256
    eos_token_id: int = 257
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self) | {"architectures": list(self.architectures)}


def demo_config() -> DemoConfig:
    return DemoConfig()


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


def demo_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", chat_template=CHAT_TEMPLATE
    )
