"""Tiny random-weight Hugging Face model directories for tests (no downloads).

`build_hf_model(path, arch)` writes config.json, safetensors weights (optionally sharded), a byte-level
BPE tokenizer trained here on a built-in corpus, and a ChatML chat template. `hf_greedy` is the reference:
transformers' own greedy generation on one unpadded prompt.

Greedy robustness: HF's default init (std 0.02) gives tiny logits with near-ties, so argmax can flip on
float32 rounding differences between two correct implementations. We re-initialise every weight with a
seeded generator: linear/embedding weights ~ N(0, WEIGHT_STD^2), biases ~ N(0, BIAS_STD^2), RMSNorm
weights ~ 1 + N(0, NORM_STD^2) (so the norms are actually exercised). Logits then have a spread of a few
units and typical top-1 gaps of ~0.1-1 (see `top1_gaps`), far above float32 noise (~1e-5).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

WEIGHT_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# <|endoftext|>: transformers 5 always loads a qwen2 directory with Qwen2Tokenizer, which adds this token
# if the vocabulary lacks it (growing len(tokenizer) past the model's vocab_size).
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END, ENDOFTEXT]
# Qwen2/Llama-3 style pre-tokenization. Qwen2Tokenizer rebuilds its pipeline with exactly this (plus NFC)
# whatever tokenizer.json says, so using it here makes every AutoTokenizer load encode identically.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_VOCAB_SIZE = 400

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving engine takes many requests at once and keeps
the accelerator busy by batching them together. Each request has a prompt, and the engine writes the
keys and values of every token into a paged cache made of fixed-size blocks.

When two requests share the same beginning, the engine can reuse the cached blocks instead of computing
them again. This is called prefix caching, and it saves a lot of time for chat applications where the
same system prompt is sent with every message.

Once upon a time there was a small village at the edge of a great forest. The people of the village
grew wheat and barley, kept sheep and goats, and told stories by the fire on long winter evenings.
Children played by the river in the summer, and the old miller watched the water turn his wheel.

Numbers like 1, 2, 3, 42, 100 and 2048 appear in text too, as do punctuation marks: commas, periods,
question marks? exclamation marks! and quotes "like this". Some words are long, such as
internationalization, while others are short, like a, an, the, of and to.

Scientists measure the temperature of the ocean, the speed of the wind and the height of the waves.
They write down what they see, compare it with what they expected, and change their models when the
data disagree. Good measurements are careful, repeatable and honest about their uncertainty.
"""

# Per-architecture tiny configs. hidden 64, 2 layers, GQA where the real models use it.
_ARCHS: dict[str, dict] = {
    "llama": dict(
        cls="LlamaForCausalLM",
        config="LlamaConfig",
        tie=False,
        kwargs=dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
        ),
    ),
    "qwen2": dict(
        cls="Qwen2ForCausalLM",
        config="Qwen2Config",
        tie=True,
        kwargs=dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
        ),
    ),
    "qwen3": dict(
        cls="Qwen3ForCausalLM",
        config="Qwen3Config",
        tie=True,
        # head_dim 32 != hidden/heads (16): q_proj is 64 -> 128, o_proj 128 -> 64.
        kwargs=dict(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
        ),
    ),
    "mistral": dict(
        cls="MistralForCausalLM",
        config="MistralConfig",
        tie=False,
        # one KV head (MQA) for variety; no sliding window.
        kwargs=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=None,
        ),
    ),
}

ARCHS = tuple(_ARCHS)

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}

_TOKENIZER = None


def get_tokenizer():
    """The test tokenizer (a transformers.PreTrainedTokenizerFast), trained once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TOKENIZER_VOCAB_SIZE,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            additional_special_tokens=[IM_START, IM_END, ENDOFTEXT],
        )
        fast.chat_template = CHAT_TEMPLATE
        _TOKENIZER = fast
    return _TOKENIZER


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied weights appear once
        if name.endswith("norm.weight"):
            p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * torch.randn(p.shape, generator=g))
        else:
            p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=g))


def build_hf_model(
    path,
    arch: str,
    *,
    tie_word_embeddings: bool | None = None,
    dtype: str = "float32",
    num_shards: int = 1,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a complete tiny HF model directory for `arch` at `path` and return it.

    arch: "llama" | "qwen2" | "qwen3" | "mistral". `overrides` go into the config (e.g.
    rope_scaling=LLAMA3_ROPE_SCALING, num_hidden_layers=3). dtype: weights' storage dtype.
    num_shards > 1 writes model-0000k-of-0000n.safetensors plus model.safetensors.index.json.
    Same arguments -> identical weights.
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    spec = _ARCHS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer()

    kwargs = dict(spec["kwargs"])
    kwargs.update(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=spec["tie"] if tie_word_embeddings is None else tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    kwargs.update(overrides)
    config = _transformers_class(spec["config"])(**kwargs)
    config.architectures = [spec["cls"]]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    torch.manual_seed(seed)
    model = _transformers_class(spec["cls"])(config).to(torch.float32)
    _reinit_(model, seed)
    model = model.to(torch_dtype)
    model.config.dtype = dtype
    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    for old in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        old.unlink()
    model.save_pretrained(path, safe_serialization=True)
    if num_shards > 1:
        _reshard(path, num_shards)
    tokenizer.save_pretrained(path)
    return path


def _reshard(path: Path, num_shards: int) -> None:
    """Split the single model.safetensors into exactly `num_shards` files plus the HF index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = path / "model.safetensors"
    with safe_open(single, "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    if num_shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} shards")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # greedy fill by bytes, keeping at least one tensor per remaining shard
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    target = total / num_shards
    k, filled = 0, 0
    for i, name in enumerate(names):
        remaining_names = len(names) - i
        remaining_shards = num_shards - k
        if shards[k] and (filled >= target * (k + 1) or remaining_names < remaining_shards):
            k += 1
        shards[k].append(name)
        filled += tensors[name].numel() * tensors[name].element_size()
    assert all(shards), "empty shard"
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(path / fname), metadata=metadata)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


# ----------------------------------------------------------------------------------------------------
# reference generation

_HF_MODELS: dict[str, torch.nn.Module] = {}
_HF_GREEDY: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


def load_hf_model(model_dir) -> torch.nn.Module:
    """transformers' model for `model_dir` in float32, cached per directory."""
    key = os.path.realpath(model_dir)
    if key not in _HF_MODELS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32)
        model.eval()
        _HF_MODELS[key] = model
    return _HF_MODELS[key]


@torch.no_grad()
def hf_greedy(model_dir, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ONE prompt by transformers (float32, no padding): the new token ids only.

    EOS handling: we pass eos_token_id=None so generation never stops early and EOS is an ordinary
    token that can be picked (this matches pdserve's `ignore_eos=True`; `min_new_tokens` would instead
    mask EOS and change the argmax). The result always has exactly `max_new_tokens` ids.
    Results are cached per (directory, prompt, max_new_tokens).
    """
    key = (os.path.realpath(model_dir), tuple(prompt_ids), max_new_tokens)
    if key in _HF_GREEDY:
        return list(_HF_GREEDY[key])
    model = load_hf_model(model_dir)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    # eos_token_id=None must be a generate() kwarg: a GenerationConfig object with eos None gets the
    # model's generation_config eos merged back in.
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == max_new_tokens, (len(new), max_new_tokens)
    _HF_GREEDY[key] = list(new)
    return new


@torch.no_grad()
def top1_gaps(model_dir, token_ids: list[int]) -> torch.Tensor:
    """Per position, the float32 logit gap between the best and second-best next token (HF reference)."""
    model = load_hf_model(model_dir)
    logits = model(torch.tensor([list(token_ids)])).logits[0]
    top2 = logits.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def text_prompt_ids(n: int, offset: int = 0) -> list[int]:
    """`n` token ids of natural text from the corpus (no special tokens), starting `offset` tokens in."""
    tok = get_tokenizer()
    ids = tok.encode(CORPUS * (1 + math.ceil((n + offset) / 100)), add_special_tokens=False)
    assert len(ids) >= n + offset
    return ids[offset : offset + n]


def copy_model_dir(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)
