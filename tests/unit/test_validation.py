"""Bad inputs and bad model directories: a ValueError that names the problem, and the engine keeps serving."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from pdserve import LLM, SamplingParams

NUM_KV_BLOCKS = 64


def greedy(max_tokens: int = 3) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(model=str(llama_dir), num_kv_blocks=NUM_KV_BLOCKS)


@pytest.fixture(scope="module")
def short_llm(llama_dir) -> LLM:
    return LLM(model=str(llama_dir), num_kv_blocks=NUM_KV_BLOCKS, max_model_len=64)


def assert_still_serves(llm: LLM) -> None:
    """After a rejected request: nothing left queued, no block leaked, and a valid request completes."""
    assert not llm.engine.has_unfinished()
    llm.engine.blocks.check_no_leak()
    outs = llm.generate([[5, 6, 7, 8]], greedy(3))
    assert len(outs) == 1 and len(outs[0].token_ids) == 3
    assert outs[0].finish_reason == "length"
    assert not llm.engine.has_unfinished()
    llm.engine.blocks.check_no_leak()


# ---------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    "prompt", ["", [], [""], [[]]], ids=["empty-str", "empty-list", "batch-of-empty-str", "batch-of-empty-ids"]
)
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValueError, match=r"(?i)prompt|empty"):
        llm.generate(prompt, greedy())
    assert_still_serves(llm)


def test_empty_prompt_via_engine(llm):
    with pytest.raises(ValueError, match=r"(?i)prompt|empty"):
        llm.engine.add_request("empty", [], greedy())
    assert_still_serves(llm)


def test_prompt_longer_than_context(short_llm):
    prompt = [(7 * i) % 300 + 5 for i in range(100)]
    with pytest.raises(ValueError, match=r"(?i)max_model_len|context|too long"):
        short_llm.generate([prompt], greedy())
    assert_still_serves(short_llm)


@pytest.mark.parametrize("bad", [400, 10**6, -1], ids=["vocab-size", "huge", "negative"])
def test_unknown_token_ids(llm, bad):
    assert len(llm.tokenizer) == 400  # the test tokenizer's vocabulary: ids 0..399
    with pytest.raises(ValueError, match=r"(?i)token"):
        llm.generate([[5, 6, bad, 7]], greedy())
    assert_still_serves(llm)


def test_bad_prompt_in_batch_rejects_without_leaking(llm):
    with pytest.raises(ValueError, match=r"(?i)token"):
        llm.generate([[5, 6, 7], [5, 6, 10**6]], greedy())
    assert_still_serves(llm)


# ------------------------------------------------------------------------------------ sampling params


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_tokens", dict(max_tokens=0)),
        ("max_tokens", dict(max_tokens=-3)),
        ("temperature", dict(temperature=-0.5)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.5)),
    ],
    ids=["max_tokens=0", "max_tokens<0", "temperature<0", "top_p=0", "top_p>1"],
)
def test_bad_sampling_params(llm, field, kwargs):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate([[5, 6, 7]], SamplingParams(**kwargs))
    assert_still_serves(llm)


# ------------------------------------------------------------------------------------- model loading


@pytest.fixture
def model_copy(llama_dir, tmp_path):
    """A private copy of the llama directory to corrupt."""
    return shutil.copytree(llama_dir, tmp_path / "model")


def load(path) -> LLM:
    return LLM(model=str(path), num_kv_blocks=NUM_KV_BLOCKS)


def test_nonexistent_directory(tmp_path):
    with pytest.raises(ValueError, match="no_such_model"):
        load(tmp_path / "no_such_model")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json"):
        load(model_copy)


def test_malformed_config(model_copy):
    (model_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match=r"config\.json"):
        load(model_copy)


def test_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load(model_copy)


def test_missing_safetensors(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load(model_copy)


def test_missing_shard(sharded_dir, tmp_path):
    model = shutil.copytree(sharded_dir, tmp_path / "model")
    (model / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=re.escape("model-00002-of-00003.safetensors")):
        load(model)


def _rewrite_weights(model_dir, edit) -> None:
    file = model_dir / "model.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata=metadata)


MISSING_KEY = "model.layers.1.mlp.down_proj.weight"


def test_missing_weight(model_copy):
    _rewrite_weights(model_copy, lambda t: t.pop(MISSING_KEY))
    with pytest.raises(ValueError, match=re.escape(MISSING_KEY)):
        load(model_copy)


def test_wrong_weight_shape(model_copy):
    key = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        t[key] = t[key][:-1].contiguous()

    _rewrite_weights(model_copy, edit)
    with pytest.raises(ValueError, match=re.escape(key)):
        load(model_copy)
