"""A model's identity, config and tokenizer without its weights (no torch), plus request validation.

The API server and the global scheduler use this; the engine's loader adds the weights on top.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pdserve.protocol import SamplingParams

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEMO_MODEL_ID = "pdserve-demo"


@dataclass
class ModelInfo:
    path: str | None  # None: the embedded demo model
    model_id: str  # salts block hashes; also the default served model name
    config: object  # transformers PretrainedConfig (the demo's: a `DemoConfig` of the same fields)
    tokenizer: object  # transformers tokenizer
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    is_demo: bool

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A text prompt through the tokenizer (with its special tokens, e.g. BOS); token ids pass through."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt)) if prompt else []
        if isinstance(prompt, list):
            return prompt
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Messages through the model's chat template, ending with the assistant's generation prompt."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja errors, a tokenizer without a template, malformed messages
            raise ValueError(f"cannot apply the chat template: {e}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError naming the problem with a request (what the engine would refuse)."""
    params.validate()
    if not prompt_token_ids:
        raise ValueError("prompt is empty")
    bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"prompt has token ids outside the model's vocabulary [0, {vocab_size}) (its embedding size): {bad[:5]}"
        )
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(prompt_token_ids)} tokens, which leaves no room to generate within the "
            f"context length (max_model_len={max_model_len})"
        )


def load_model_info(path: str | None, max_model_len: int | None = None) -> ModelInfo:
    if path is None:
        from pdserve.demo_model import demo_config, demo_tokenizer

        config, tokenizer, model_id = demo_config(), demo_tokenizer(), DEMO_MODEL_ID
    else:
        config, raw = _read_config(Path(path))
        tokenizer = _read_tokenizer(Path(path))
        model_id = f"{Path(path).resolve().name}-{hashlib.sha256(raw).hexdigest()[:12]}"
    if len(tokenizer) > config.vocab_size:
        # transformers loads such checkpoints (a token added to the tokenizer, the embedding not resized);
        # requests that contain an id past the embedding are refused by `validate_request`
        log.warning(
            "the tokenizer has %d tokens but the model's embedding has %d (vocab_size): requests containing "
            "token ids >= %d will be rejected",
            len(tokenizer), config.vocab_size, config.vocab_size,
        )  # fmt: skip
    limit = _context_limit(config)
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
    return ModelInfo(
        path=path,
        model_id=model_id,
        config=config,
        tokenizer=tokenizer,
        vocab_size=config.vocab_size,
        max_model_len=max_model_len or limit,
        eos_token_ids=frozenset(_eos_ids(config, tokenizer)),
        is_demo=path is None,
    )


def _context_limit(config) -> int:
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        limit = min(limit, window)  # within the window, sliding-window attention equals full attention
    return limit


def _read_config(path: Path):
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: a model directory needs config.json")
    raw = file.read_bytes()
    try:
        arch = (json.loads(raw).get("architectures") or [None])[0]
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; pdserve supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)), raw
    except Exception as e:  # transformers raises several types for a bad config
        raise ValueError(f"cannot parse {file}: {e}") from None


def _read_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # missing or unreadable tokenizer files
        raise ValueError(f"cannot load the tokenizer from {path}: {e}") from None


def _eos_ids(config, tokenizer) -> set[int]:
    ids = getattr(config, "eos_token_id", None)
    out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        out.add(tokenizer.eos_token_id)
    return out
