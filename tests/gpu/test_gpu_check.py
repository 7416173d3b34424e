"""bench/gpu_check.py's sections as tests on a CUDA device (skipped without one; the full-size run with
timings is the script itself). Each asserts its section's own pass condition."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from bench.gpu_check import set_flashinfer_env
    from bench.gpu_sections import Context

    device = torch.device("cuda")
    set_flashinfer_env(device)
    return Context(device=device, smoke=False, work=tmp_path_factory.mktemp("gpu-check"))


def check(result: dict) -> dict:
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    assert result["ok"], result
    return result


def test_bf16_greedy_agrees_with_float32_and_sampling_runs_on_cuda(ctx):
    from bench.gpu_sections import parity

    r = check(parity(ctx))
    assert all(row["f32=hf"] for row in r["rows"]) and r["same_seed_same"]


def test_load_peak_is_the_weights_and_kv_blocks_fill_the_budget(ctx):
    from bench.gpu_sections import memory

    check(memory(ctx))


def test_flashinfer_matches_its_reference_and_torch(ctx):
    pytest.importorskip("flashinfer")
    from bench.gpu_sections import kernels

    r = check(kernels(ctx))
    assert "flashinfer_err" in r["rows"][0]


def test_cuda_graphs_give_the_same_tokens_and_replay(ctx):
    pytest.importorskip("flashinfer")
    from bench.gpu_sections import graphs

    assert check(graphs(ctx))["captured"]


def test_nixl_pulls_exact_bytes_between_vram_caches(ctx):
    pytest.importorskip("nixl")
    from bench.gpu_sections import nixl

    assert check(nixl(ctx))["memory"] == "VRAM"


def test_roofline_runs_on_small_shapes(ctx):
    from bench.gpu_sections import Context, roofline

    check(roofline(Context(device=ctx.device, smoke=True, work=ctx.work)))
