"""bench/gpu_check.py --smoke on CPU: every section runs (or says why it is skipped) and the JSON is written, so
the one prepared GPU script cannot rot between GPU runs. Its numbers mean nothing on CPU."""

from __future__ import annotations

import json


def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path):
    from bench.gpu_check import ORDER, main

    report = main([str(tmp_path), "--smoke", "--device", "cpu"])
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(written["sections"]) == ORDER == list(report["sections"])
    for name, result in written["sections"].items():
        assert result.get("ok") or result.get("skipped"), (name, result.get("error"), result.get("traceback"))
    assert written["sections"]["memory"]["skipped"]  # CUDA-only
    parity = written["sections"]["parity"]
    assert all(row["f32=hf"] for row in parity["rows"]) and parity["same_seed_same"] and parity["other_seed_differs"]
    assert written["sections"]["graphs"]["backend"] == "flashinfer_reference"
