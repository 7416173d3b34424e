"""Build an engine's model: config and tokenizer from `model_info`, weights from safetensors (or the demo).

Every problem with the directory is a ValueError that names the file or weight at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.models import build_model, load_state
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.model_info import ModelInfo, load_model_info


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (`EngineConfig.dtype` is validated against the same names)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    info: ModelInfo


def load(path: str | None, dtype: torch.dtype, device: torch.device, max_model_len: int | None) -> LoadedModel:
    info = load_model_info(path, max_model_len)
    if path is None:
        from pdserve.engine.models.demo import demo_state_dict

        tensors = demo_state_dict(info.config)
    else:
        tensors = _read_weights(Path(path))
    model = build_model(info.config, dtype, device, info.max_model_len)
    load_state(model, tensors)
    return LoadedModel(model, info)


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
