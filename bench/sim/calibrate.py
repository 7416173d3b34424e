"""Fit the simulator's latency model to pdserve's own engine on this machine (CPU, random-weight Llama).

Times single engine steps: prefill chunks of n new tokens after s cached tokens, and decode steps of B
sequences with C context tokens in all, then fits (weighted least squares, non-negative)
    step(n, s) = a + b*n + c*n^2 + d*n*s        decode(B, C) = a + b*C + c*B
and writes pdserve/sim/calibration_cpu.json with the fit quality.

    python -m bench.sim.calibrate [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pdserve.sim.model import CALIBRATIONS, LatencyModel

PREFILL_NEW = [32, 128, 512, 1024, 2048]
PREFILL_CACHED = [0, 1024, 4096]
DECODE_BATCH = [1, 4, 16, 32, 64]
DECODE_CTX = [128, 512, 1024, 2048]
MAX_DECODE_TOKENS = 65536
MIXED_CHECK = [(16, 512, 256), (16, 512, 1024), (32, 256, 512)]  # (batch, ctx, new): checks the additive model


def fit_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative error (rows weighted by 1/y); columns whose coefficient comes out negative
    are dropped and the rest refitted (a small active set: every coefficient is a physical cost >= 0)."""
    w = 1.0 / y
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all():
            full = np.zeros(x.shape[1])
            full[active] = coef
            return full
        active.pop(int(np.argmin(coef)))


def quality(x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> dict:
    pred = x @ coef
    rel = np.abs(pred - y) / y
    ss_res, ss_tot = float(((pred - y) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"r2": 1 - ss_res / ss_tot, "mean_rel_err": float(rel.mean()), "max_rel_err": float(rel.max())}


def machine() -> str:
    """This machine in a few words: CPU model and core count (what the step times depend on)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs ({platform.system()})"


class Bench:
    def __init__(self, model_dir: Path, repeats: int) -> None:
        from pdserve.config import EngineConfig
        from pdserve.engine.engine import LLMEngine

        self.engine = LLMEngine(
            EngineConfig(model=str(model_dir), max_num_batched_tokens=8192, max_num_seqs=128, num_kv_blocks=8192)
        )
        self.repeats = repeats
        self.rng = random.Random(0)
        self.ids = 0

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(4, 32000) for _ in range(n)]

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        from pdserve.protocol import SamplingParams

        self.ids += 1
        rid = f"c{self.ids}"
        self.engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return rid

    def _drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()

    def prefill(self, new: int, cached: int) -> float:
        """One step computing `new` tokens after `cached` tokens found in the prefix cache (median)."""
        times = []
        for _ in range(self.repeats):
            prefix = self._tokens(cached)
            if cached:
                self._add(prefix + self._tokens(16), 1)  # caches the prefix's full blocks
                self._drain()
            self._add(prefix + self._tokens(new), 1)
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
            self._drain()
        return statistics.median(times)

    def decode(self, batch: int, ctx: int, steps: int = 9) -> float:
        """Median decode step with `batch` sequences of about `ctx` tokens each (prefilled first)."""
        rids = [self._add(self._tokens(ctx), 10_000) for _ in range(batch)]
        while any(not self.engine.requests[r].output_token_ids for r in rids):
            self.engine.step()
        times = []
        for _ in range(max(steps, self.repeats)):
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
        for r in rids:
            self.engine.abort(r)
        return statistics.median(times)

    def mixed(self, batch: int, ctx: int, new: int) -> float:
        """Median step that decodes `batch` sequences and prefills one `new`-token prompt (a model check)."""
        rids = [self._add(self._tokens(ctx), 10_000) for _ in range(batch)]
        while any(not self.engine.requests[r].output_token_ids for r in rids):
            self.engine.step()
        times = []
        for _ in range(self.repeats):
            self._add(self._tokens(new), 1)
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
        for r in rids:
            self.engine.abort(r)
        return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: one engine per core)")
    ap.add_argument("--out", type=Path, default=CALIBRATIONS["cpu"])
    args = ap.parse_args()
    import torch

    from bench.common import build_random_llama

    torch.set_num_threads(args.threads)
    model_dir = build_random_llama(Path(tempfile.mkdtemp(prefix="pdserve-sim-")) / "llama", max_positions=16384)
    bench = Bench(model_dir, repeats=1 if args.quick else 3)
    bench.prefill(64, 0)
    bench.decode(2, 64)  # warm both paths
    load_before = os.getloadavg()
    news = PREFILL_NEW[:3] if args.quick else PREFILL_NEW
    prefill_rows = [(n, s, bench.prefill(n, s)) for n in news for s in PREFILL_CACHED]
    batches = DECODE_BATCH[:3] if args.quick else DECODE_BATCH
    decode_rows = [(b, b * c, bench.decode(b, c)) for b in batches for c in DECODE_CTX if b * c <= MAX_DECODE_TOKENS]

    xp = np.array([[1, n, n * n, n * s] for n, s, _ in prefill_rows], dtype=float)
    yp = np.array([t for *_, t in prefill_rows])
    cp = fit_nonneg(xp, yp)
    xd = np.array([[1, c, b] for b, c, _ in decode_rows], dtype=float)
    yd = np.array([t for *_, t in decode_rows])
    cd = fit_nonneg(xd, yd)
    model = LatencyModel.from_json(
        {"name": "cpu", "prefill": dict(zip("abcd", cp)), "decode": dict(zip("abc", cd)), "kv_bytes_per_token": 0}
        | {"kv_capacity_tokens": 0, "max_num_batched_tokens": 8192, "transfer_bytes_per_s": 1, "transfer_overhead_s": 0}
    )
    mixed_rows = []
    for b, c, n in MIXED_CHECK[:1] if args.quick else MIXED_CHECK:
        measured = bench.mixed(b, c, n)
        predicted = model.step_s(model.chunk_s(n, 0), b, b * (c + 1))
        mixed_rows.append({"batch": b, "context": c, "new": n, "s": measured, "predicted_s": predicted})
    engine = bench.engine
    spec = engine.runner.model.spec
    kv_bytes_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    cpu_kv_budget = 512 << 20  # pdserve's default CPU KV cache (engine/model_runner.py)
    out = {
        "name": "cpu",
        "kind": "measured",
        "source": "bench/sim/calibrate.py: single LLMEngine steps on this machine, median of repeats",
        "provenance": f"measured: `{' '.join(['python -m bench.sim.calibrate', *sys.argv[1:]])}` "
        f"({args.threads} torch thread(s), medians of repeated steps) timing single steps of pdserve's engine on a "
        f"random-weight Llama (hidden 256, 4 layers, float32, torch attention) on {machine()}, "
        f"{datetime.date.today().isoformat()}; KV transfer rate from bench/kv_transfer.py plus an assumed 2 ms "
        "per handoff",
        "model": "bench/common.py::build_random_llama defaults (hidden 256, 4 layers, 8 heads, 4 KV heads, "
        "head_dim 32, vocab 32000; max_positions 16384), float32, torch attention backend",
        "torch_threads": args.threads,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "prefill": dict(zip("abcd", map(float, cp))),
        "prefill_fit": quality(xp, yp, cp),
        "decode": dict(zip("abc", map(float, cd))),
        "decode_fit": quality(xd, yd, cd),
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_capacity_tokens": cpu_kv_budget // kv_bytes_per_token,
        "kv_capacity_source": "pdserve's default CPU KV budget, 512 MiB (engine/model_runner.py)",
        "max_num_batched_tokens": 2048,
        "chunk_source": "pdserve EngineConfig default max_num_batched_tokens",
        "transfer_bytes_per_s": 5.0e9,
        "transfer_overhead_s": 0.002,
        "transfer_source": "5 GB/s: NIXL pulls of 16-64 MB on this machine (bench/results/kv_transfer.json, 4k pages); "
        "2 ms fixed: assumption covering the decode/reserve/release actor calls around a pull (pull alone 0.03 ms)",
        "points": {
            "prefill": [{"new": n, "cached": s, "s": t} for n, s, t in prefill_rows],
            "decode": [{"batch": b, "context_tokens": c, "s": t} for b, c, t in decode_rows],
            "mixed_check": mixed_rows,
        },
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"prefill step = {cp[0]:.3g} + {cp[1]:.3g}*n + {cp[2]:.3g}*n^2 + {cp[3]:.3g}*n*s   {out['prefill_fit']}")
    print(f"decode step  = {cd[0]:.3g} + {cd[1]:.3g}*C + {cd[2]:.3g}*B   {out['decode_fit']}")
    for m in mixed_rows:
        print(
            f"mixed step {m['batch']} decodes x {m['context']} + {m['new']} new: "
            f"{m['s']:.4f} s, model {m['predicted_s']:.4f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
