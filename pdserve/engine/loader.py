"""Build an engine's model: config and tokenizer from `model_info`, weights from safetensors (or the demo).

Every problem with the directory is a ValueError that names the file or weight at fault.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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


def load(path: str | None, dtype: torch.dtype, device: torch.device, max_model_len: int | None, tp=None) -> LoadedModel:
    """`tp` (a parallel.TPShard of size > 1): build this rank's part and read only its slice of each tensor."""
    info = load_model_info(path, max_model_len)
    model = build_model(info.config, dtype, device, info.max_model_len, tp)
    shard = _sharder(info.config, tp)
    if path is None:
        from pdserve.engine.models.demo import demo_state_dict

        tensors = demo_state_dict(info.config)
        if shard is not None:
            tensors = {name: shard(name, t, tuple(t.shape)) for name, t in tensors.items()}
        load_state(model, tensors)
        return LoadedModel(model, info)
    with SafetensorsWeights(Path(path), device, shard) as tensors:
        load_state(model, tensors)
    return LoadedModel(model, info)


def _sharder(config, tp):
    if tp is None or tp.size == 1:
        return None
    from pdserve.engine.models import spec_from_config
    from pdserve.engine.parallel import head_split, shard_tensor

    spec = spec_from_config(config)
    split = head_split(spec, tp.size, tp.rank)
    return lambda name, full, shape: shard_tensor(name, full, shape, spec, split, tp.rank)


class SafetensorsWeights(Mapping):
    """A checkpoint's tensors by name, each read from its safetensors file when indexed, straight onto the
    device (safetensors maps the file; no whole-checkpoint copy in host memory). Each file is opened once, at
    its first tensor, and stays open until `close` (or the end of a `with` block). Problems with the files are
    ValueErrors naming the file."""

    def __init__(self, path: Path, device: torch.device, shard=None) -> None:
        from safetensors import SafetensorError, safe_open

        self._error = SafetensorError
        self._shard = shard  # (name, lazy slice, full shape) -> this rank's part, read from the file alone
        self._device = str(device)
        self._files: dict[str, Path] = {}  # tensor name -> its file
        self._open: dict[Path, object] = {}  # file -> its open handle
        for file in _weight_files(path):
            try:
                with safe_open(str(file), framework="pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"cannot read safetensors file {file}: {e}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files[name]
        try:
            handle = self._open.get(file)
            if handle is None:
                handle = self._open[file] = safe_open(str(file), framework="pt", device=self._device).__enter__()
            if self._shard is None:
                return handle.get_tensor(name)
            part = handle.get_slice(name)
            return self._shard(name, part, tuple(part.get_shape()))
        except (self._error, OSError) as e:
            raise ValueError(f"cannot read {name} from safetensors file {file}: {e}") from None

    def close(self) -> None:
        handles, self._open = self._open, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _weight_files(path: Path) -> list[Path]:
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
        return [path / f for f in files]
    paths = sorted(path.glob("*.safetensors"))
    if not paths:
        raise ValueError(f"no *.safetensors weights found in {path}")
    return paths
