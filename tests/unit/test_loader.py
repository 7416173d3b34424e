"""Loading weights: parameters are created once, in the target dtype, on the target device; the checkpoint is
read a tensor at a time. Counted with a dispatch probe: every tensor an aten op makes during the load."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdserve.engine import loader
from tests.models import build_hf_model


class Allocations(TorchDispatchMode):
    """Records (dtype, shape) of every tensor the ops under it return."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.made.append((t.dtype, tuple(t.shape)))
        return out


def test_a_bf16_load_makes_no_float32_weights(tmp_path):
    model_dir = build_hf_model(tmp_path / "m", "llama", dtype="bfloat16", num_shards=2)
    with Allocations() as probe:
        loaded = loader.load(str(model_dir), torch.bfloat16, torch.device("cpu"), None)
    params = dict(loaded.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    shapes = {tuple(p.shape) for p in params.values()}
    float32 = [shape for dtype, shape in probe.made if dtype == torch.float32 and shape in shapes]
    assert not float32, f"float32 tensors of weight shapes were made during the load: {float32[:4]}"
    # and the weights are the checkpoint's, bit for bit
    ckpt = loader.SafetensorsWeights(model_dir, torch.device("cpu"))
    for name, param in params.items():
        assert torch.equal(param, ckpt[name]), name


def test_the_old_way_would_be_seen(tmp_path):
    """The probe sees a float32 build cast afterwards (what the loader did before): the test above can fail."""
    model_dir = build_hf_model(tmp_path / "m", "llama", dtype="bfloat16")
    info = loader.load_model_info(str(model_dir), None)
    from pdserve.engine.models import spec_from_config
    from pdserve.engine.models.llama import LlamaForCausalLM

    with Allocations() as probe:
        with torch.device("meta"):
            model = LlamaForCausalLM(spec_from_config(info.config))
        model.to_empty(device="cpu").to(torch.bfloat16)
    shapes = {tuple(p.shape) for p in model.parameters()}
    assert any(dtype == torch.float32 and shape in shapes for dtype, shape in probe.made)


def test_each_file_is_opened_once_and_closed(tmp_path, monkeypatch):
    import safetensors

    model_dir = build_hf_model(tmp_path / "m", "llama", num_shards=2)
    opened = []
    real = safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    with loader.SafetensorsWeights(model_dir, torch.device("cpu")) as ckpt:
        index_opens = len(opened)
        tensors = {name: ckpt[name] for name in ckpt}
        assert len(opened) - index_opens == 2 == len(ckpt._open)  # one handle per shard, not one per tensor
    assert not ckpt._open and len(tensors) > 2


def test_a_tensor_that_cannot_be_read_is_an_error_naming_it_and_its_file(tmp_path):
    model_dir = build_hf_model(tmp_path / "m", "llama")
    ckpt = loader.SafetensorsWeights(model_dir, torch.device("cpu"))  # the keys are read here
    [file] = model_dir.glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:64])  # then the file is cut short
    name = next(iter(ckpt))
    with pytest.raises(ValueError, match=rf"cannot read {name} from safetensors file .*{file.name}"):
        ckpt[name]
    ckpt.close()
