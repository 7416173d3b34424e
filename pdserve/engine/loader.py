"""Load a Hugging Face model directory (config.json, safetensors shards, tokenizer) or the embedded demo.

Every problem with the directory is a ValueError that names the file or weight at fault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.models import build_model, load_state
from pdserve.engine.models.llama import LlamaForCausalLM


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: object  # the transformers PretrainedConfig
    tokenizer: object  # a transformers tokenizer
    model_id: str  # identity used to salt block hashes and name the model in the API
    max_model_len: int
    is_demo: bool = False


def load(path: str | None, dtype: torch.dtype, device: torch.device, max_model_len: int | None) -> LoadedModel:
    if path is None:
        from pdserve.engine.models.demo import demo_config, demo_state_dict, demo_tokenizer

        config = demo_config()
        tensors, tokenizer, model_id, is_demo = demo_state_dict(config), demo_tokenizer(), "pdserve-demo", True
    else:
        config, config_bytes = _read_config(Path(path))
        tensors = _read_weights(Path(path))
        tokenizer = _read_tokenizer(Path(path))
        model_id = f"{Path(path).resolve().name}-{hashlib.sha256(config_bytes).hexdigest()[:12]}"
        is_demo = False
    limit = _context_limit(config)
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
    max_len = max_model_len or limit
    model = build_model(config, dtype, device, max_len)
    load_state(model, tensors)
    _check_tokenizer(tokenizer, config)
    return LoadedModel(model, config, tokenizer, model_id, max_len, is_demo)


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
        json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises several types for a bad config
        raise ValueError(f"cannot parse {file}: {e}") from None
    from pdserve.engine.models import spec_from_config

    spec_from_config(config)  # fail early on an unsupported architecture
    return config, raw


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is malformed: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ValueError(f"safetensors shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        paths = [path / f for f in files]
    else:
        paths = sorted(path.glob("*.safetensors"))
        if not paths:
            raise ValueError(f"no *.safetensors weights found in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in paths:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {file}: {e}") from None
    return tensors


def _read_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # missing or unreadable tokenizer files
        raise ValueError(f"cannot load the tokenizer from {path}: {e}") from None


def _check_tokenizer(tokenizer, config) -> None:
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
