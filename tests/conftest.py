"""Shared fixtures: tiny random-weight HF model directories built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.models import LLAMA3_ROPE_SCALING, build_hf_model  # importable: pyproject's pytest `pythonpath`


def serve_config(**kw):
    """A ServeConfig for a test deployment: its own name (several may share one Ray cluster) and a free
    port for its controller's metrics."""
    import uuid

    from pdserve.config import ServeConfig

    kw.setdefault("name", f"t{uuid.uuid4().hex[:8]}")
    kw.setdefault("controller", {"metrics_port": 0})
    return ServeConfig(**kw)


_MARKERS = {
    "gpu": "needs a CUDA device",
    "slow": "slow test",
    "ray": "needs Ray",
    "e2e": "end-to-end test (HTTP server, processes)",
    "needs_binary": "needs_binary(name, ...): runs these executables from PATH (see needs_binary)",
}
INSTALL = {"prometheus": "apt-get install prometheus", "promtool": "apt-get install prometheus"}


def pytest_configure(config: pytest.Config) -> None:
    declared = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, help_text in _MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {help_text}")


def needs_binary(*names: str) -> pytest.MarkDecorator:
    """Mark a test that runs these executables from PATH. Without them it skips, saying how to install them;
    with CI=true in the environment it fails instead, so a CI run whose set-up could not install them does
    not pass by skipping (`.ci/run` and `make test` install Prometheus where they can)."""
    return pytest.mark.needs_binary(*names)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _missing_binaries(item: pytest.Item) -> tuple[list[str], str]:
    missing = [name for mark in item.iter_markers("needs_binary") for name in mark.args if shutil.which(name) is None]
    return missing, "; ".join(sorted({INSTALL.get(name, f"install {name}") for name in missing}))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():  # CPU CI stays green; bench/gpu_check.py is what runs on a GPU
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    if _in_ci():
        return  # pytest_runtest_setup fails them instead
    for item in items:
        missing, how = _missing_binaries(item)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} on PATH (as root: {how})"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing, how = _missing_binaries(item)
    if missing and _in_ci():
        pytest.fail(f"CI=true and {', '.join(missing)} not on PATH: CI must install it ({how})", pytrace=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny ops (the demo model, many steps): one intra-op thread is faster, and is not stalled
    by other jobs on the cores. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, arch: str, **kwargs) -> Path:
    return build_hf_model(tmp_path_factory.mktemp(name), arch, **kwargs)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """LlamaForCausalLM: GQA (4 heads, 2 KV heads), untied embeddings."""
    return _build(tmp_path_factory, "llama", "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """Qwen2ForCausalLM: tied embeddings, q/k/v biases.

    seed=1: with seed 0 one reference step of the parity prompts has a top-1 logit gap of only 2e-4;
    seed 1's smallest is 2.6e-3 (see test_reference_has_clear_top1_margins)."""
    return _build(tmp_path_factory, "qwen2", "qwen2", seed=1)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """Qwen3ForCausalLM: q/k RMSNorm, head_dim 32 != hidden 64 / 4 heads, tied embeddings."""
    return _build(tmp_path_factory, "qwen3", "qwen3")


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> Path:
    """MistralForCausalLM: one KV head, sliding_window=None, untied embeddings."""
    return _build(tmp_path_factory, "mistral", "mistral")


@pytest.fixture(scope="session")
def llama3_rope_dir(tmp_path_factory) -> Path:
    """Llama with Llama-3 rope scaling (factor 8, original context 128) in config.rope_parameters."""
    return _build(tmp_path_factory, "llama3_rope", "llama", rope_scaling=dict(LLAMA3_ROPE_SCALING))


@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory) -> Path:
    """The llama model (same weights as llama_dir) split into 3 safetensors shards with an index."""
    return _build(tmp_path_factory, "sharded", "llama", num_shards=3)
