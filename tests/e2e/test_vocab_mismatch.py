"""A checkpoint whose tokenizer has more tokens than its embedding (a token added without resizing): it loads
with a warning naming both sizes, serves, and refuses a request holding an id past the embedding with a 400."""

from __future__ import annotations

import logging

import httpx
import pytest

from pdserve import LLM, SamplingParams
from pdserve.api.app import create_app
from pdserve.config import EngineConfig
from pdserve.live.thread import serving
from pdserve.workers.local_client import LocalClient
from tests.models import build_hf_model, get_tokenizer


@pytest.fixture(scope="module")
def short_vocab_dir(tmp_path_factory):
    n = len(get_tokenizer())
    return build_hf_model(tmp_path_factory.mktemp("short-vocab"), "llama", vocab_size=n - 1), n


def test_loads_with_a_warning_and_refuses_ids_past_the_embedding(short_vocab_dir, caplog):
    path, n = short_vocab_dir
    with caplog.at_level(logging.WARNING, logger="pdserve.model_info"):
        llm = LLM(str(path), num_kv_blocks=32)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"tokenizer has {n} tokens" in warning and f"embedding has {n - 1}" in warning
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match=rf"outside the model's vocabulary \[0, {n - 1}\).*\[{n - 1}\]"):
        llm.generate([[5, 6, n - 1]], params)
    out = llm.generate([[5, 6, 7]], params)[0]
    assert len(out.token_ids) == 4 and all(t < n - 1 for t in out.token_ids)
    llm.engine.blocks.check_no_leak()


def test_http_answers_400_naming_the_id(short_vocab_dir):
    path, n = short_vocab_dir
    client = LocalClient(EngineConfig(model=str(path), num_kv_blocks=32))
    try:
        with serving(create_app(client)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            body = {"model": client.info.model_id, "max_tokens": 2}
            resp = http.post("/v1/completions", json={**body, "prompt": [1, 2, n - 1]})
            assert resp.status_code == 400
            err = resp.json()["error"]
            assert err["param"] == "prompt" and str(n - 1) in err["message"]
            ok = http.post("/v1/completions", json={**body, "prompt": [1, 2, 3]})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        client.engine_thread.stop()
