"""KV sizing on a GPU: the arithmetic of the budget, and the profile step that measures activations (it runs
on any device; on CPU it is only run, not measured)."""

from __future__ import annotations

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import loader
from pdserve.engine.model_runner import gpu_kv_budget, profile_step

GiB = 1 << 30


def test_the_budget_is_the_share_left_after_what_is_in_use_and_the_activation_peak():
    # an 80 GiB card, 16 GiB weights + 1 GiB context in use, 3 GiB of activations at the largest step
    assert gpu_kv_budget(80 * GiB, 63 * GiB, 3 * GiB, 0.9) == int(72 * GiB) - 17 * GiB - 3 * GiB
    # another process holding 10 GiB leaves this engine 10 GiB less
    assert gpu_kv_budget(80 * GiB, 53 * GiB, 3 * GiB, 0.9) == int(72 * GiB) - 27 * GiB - 3 * GiB
    assert gpu_kv_budget(80 * GiB, 10 * GiB, 3 * GiB, 0.9) < 0  # too little: num_kv_blocks refuses it


def test_utilization_is_a_share():
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            EngineConfig(gpu_memory_utilization=bad)


@pytest.mark.parametrize(
    "max_num_seqs, budget, tokens, rows",
    [(1, 64, 48, 1), (4, 70, 70, 4), (128, 96, 96, 96)],  # one sequence is cut to the context length (48)
)
def test_the_profile_step_runs_the_largest_step(max_num_seqs, budget, tokens, rows):
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=16)
    loaded = loader.load(None, torch.float32, torch.device("cpu"), 48)
    assert profile_step(loaded.model, config, 48, torch.device("cpu")) == (tokens, rows)
