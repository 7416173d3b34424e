"""`pdserve plan`: the layout search on workloads whose answer is known, the ranking, and the command line."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from pdserve.cli import main
from pdserve.sim.metrics import SLO
from pdserve.sim.model import CALIBRATIONS, LatencyModel, load_model
from pdserve.sim.plan import Layout, LayoutResult, PlanOptions, layouts, mixes, plan, rank
from pdserve.sim.plan_cli import calibration_line, pd_bounds
from pdserve.sim.workloads import Lengths, poisson_trace

# A decode step costs 2 ms plus little per sequence; a 2048-token prompt is one 22 ms step: a prefill chunk in
# a decode batch is ten decode steps' worth of delay.
MODEL = LatencyModel(
    name="test",
    prefill_a=0.002,
    prefill_b=1e-5,
    prefill_c=0.0,
    prefill_d=0.0,
    decode_a=0.002,
    decode_b=1e-9,
    decode_c=1e-5,
    kv_bytes_per_token=4096,
    kv_capacity_tokens=400_000,
    max_num_batched_tokens=2048,
    transfer_bytes_per_s=5e9,
    transfer_overhead_s=0.002,
)
OPTS = PlanOptions(block_size=16)


def test_decode_heavy_with_a_tight_tpot_slo_disaggregates():
    # 400-token outputs and a TPOT SLO 25% over a bare decode step: on a colocated worker a few 2048-token
    # prefills landing during a request's decode break its TPOT; decode workers never run one (2048 tokens is
    # past any local-prefill threshold of the decider, and the prompts share no prefix).
    trace = poisson_trace(lambda t: 20.0, 20.0, 12.0, Lengths((2048,), (400,)), block_size=16)
    results = plan(trace, 4, SLO(ttft_s=1.0, tpot_s=0.0025), MODEL, OPTS)
    best = results[0]
    colocated = next(r for r in results if r.layout == Layout(colocated=4))
    assert best.layout.disaggregated and best.layout.colocated == 0, [r.layout.name for r in results]
    assert best.goodput_req_s > 1.3 * colocated.goodput_req_s
    assert not best.capped and best.attainment >= 0.9
    assert {r.layout for r in results} >= set(layouts(4))  # every split was tried, and mixes on top
    assert any(r.layout.roles == 3 for r in results)
    lo, hi = pd_bounds(results)
    assert lo <= best.layout.pd_ratio <= hi


def test_short_prompts_with_loose_slos_stay_colocated():
    # Short prompts barely disturb decoding and decode is batch-bound: every worker should decode.
    model = replace(MODEL, decode_c=1e-3)
    trace = poisson_trace(lambda t: 40.0, 40.0, 10.0, Lengths((32, 64, 128), (16, 64, 128)), block_size=16)
    results = plan(trace, 4, SLO(ttft_s=2.0, tpot_s=0.1), model, OPTS, jobs=2)
    best = results[0]
    assert best.layout == Layout(colocated=4), [(r.layout.name, r.goodput_req_s) for r in results]
    top_disagg = max(r.goodput_req_s for r in results if r.layout.disaggregated)
    assert best.goodput_req_s > 1.5 * top_disagg


def _result(layout: Layout, goodput: float) -> LayoutResult:
    return LayoutResult(layout, 1.0, goodput, goodput, False, 0.1, 0.01, 0, 0)


def test_ties_go_to_the_simpler_layout_and_layouts_are_bounded():
    split, colo, mix = Layout(3, 5), Layout(colocated=8), Layout(1, 1, 6)
    assert rank([_result(split, 10.1), _result(colo, 10.0), _result(mix, 10.15)])[0].layout == colo
    assert rank([_result(split, 11.0), _result(colo, 10.0), _result(mix, 11.1)])[0].layout == split
    assert [x.layout.name for x in rank([_result(colo, 1.0), _result(split, 2.0), _result(mix, 3.0)])] == [
        "6C+1P1D",
        "3P5D",
        "8C",
    ]
    assert [x.name for x in layouts(3)] == ["1P2D", "2P1D", "3C"] and layouts(1) == [Layout(colocated=1)]
    assert [x.name for x in mixes(8, 0.375)] == ["2C+2P4D", "4C+2P2D", "6C+1P1D"] and mixes(2, 0.5) == []


def _write_mooncake(path, n=40, gap_ms=50):
    rows = [
        {"timestamp": i * gap_ms, "input_length": 40, "output_length": 8, "hash_ids": [i * 10, i * 10 + 1]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_prints_the_table_and_a_recommendation(tmp_path, capsys):
    trace = _write_mooncake(tmp_path / "t.jsonl")
    out_json = tmp_path / "plan.json"
    argv = ["plan", "--trace", str(trace), "--gpus", "2", "--slo-ttft", "1", "--slo-tpot", "0.1"]
    argv += ["--calibration", "cpu", "--block-size", "16", "--jobs", "1", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "goodput req/s" in out and "1P1D" in out and "2C" in out and "Recommended:" in out
    lines = out.splitlines()
    header = next(i for i, x in enumerate(lines) if x.startswith("layout"))  # the line above it: the calibration
    assert lines[header - 1].startswith("figures from the simulator with calibration cpu, measured: `python -m bench")
    data = json.loads(out_json.read_text())
    assert {x["name"] for x in data["layouts"]} == {"1P1D", "2C"} and data["recommended"] in ("1P1D", "2C")
    assert data["calibration_provenance"] == load_model("cpu").provenance


def test_each_calibration_says_if_it_was_measured_or_derived(tmp_path):
    assert load_model("h100").provenance.startswith("derived: a roofline model of one H100 SXM5")
    assert "not a measurement" in load_model("h100").provenance
    cpu = load_model("cpu").provenance
    assert cpu.startswith("measured: `python -m bench.sim.calibrate`") and "2-core CPU machine" in cpu
    assert calibration_line("h100", load_model("h100")).startswith(
        "figures from the simulator with calibration h100, derived:"
    )
    data = json.loads(CALIBRATIONS["cpu"].read_text())
    del data["provenance"]  # a calibration file of its own: its kind and source stand in, else it says so
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_model(str(tmp_path / "old.json")).provenance.startswith("measured: bench/sim/calibrate.py")
    del data["kind"], data["source"]
    (tmp_path / "bare.json").write_text(json.dumps(data))
    assert load_model(str(tmp_path / "bare.json")).provenance.startswith("unstated:")


def test_cli_reads_azure_csv(tmp_path, capsys):
    rows = [f"2023-11-16 18:17:{i // 10:02d}.{i % 10}000000,40,8" for i in range(30)]
    trace = tmp_path / "azure.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    argv = ["plan", "--trace", str(trace), "--gpus", "1", "--slo-ttft", "1", "--slo-tpot", "0.1"]
    assert main([*argv, "--calibration", "cpu", "--block-size", "16", "--jobs", "1"]) == 0
    assert "1C" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"--trace": "missing.jsonl"}, "--trace"),
        ({"--gpus": "0"}, "--gpus"),
        ({"--slo-ttft": "0"}, "--slo-ttft"),
        ({"--slo-tpot": "-0.1"}, "--slo-tpot"),
        ({"--calibration": "a100"}, "--calibration"),
    ],
)
def test_cli_rejects_bad_input_naming_the_flag(tmp_path, capsys, change, flag):
    flags = {"--trace": str(_write_mooncake(tmp_path / "t.jsonl")), "--gpus": "2", "--slo-ttft": "1"}
    flags |= {"--slo-tpot": "0.1", "--calibration": "cpu"}
    flags |= {k: str(tmp_path / v) if k == "--trace" else v for k, v in change.items()}
    assert main(["plan", *(x for kv in flags.items() for x in kv)]) == 2
    assert flag in capsys.readouterr().err


def test_serve_does_not_import_the_simulator():
    code = (
        "import sys, pdserve.cli as c; c.build_parser(); print([m for m in sys.modules if m.startswith('pdserve.sim')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
