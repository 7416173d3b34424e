"""Live migration of a long-context request between two workers: multi-stage (Llumnix) vs stop-and-copy vs
recompute on the target (what Dynamo and SGLang do), side by side in one run, per context length.

Run: `python bench/migration.py [--lengths 1024,4096,16384,32768] [--transport nixl]`.
Model: `bench-llama-32k`, a random-weight Llama with 8 layers, 8 KV heads of 64 (hidden 512), float32:
8 x 2 x 8 x 64 x 4 B = 32 KiB of KV per token (a 32k context holds 1 GiB of KV). Prefix caching is off, so
every move copies (or recomputes) the whole context (a target caching part of it copies less; see
tests/unit/test_migration.py).
Three colocated workers (Ray actors, KV over the chosen transport); this process polls their outboxes as
a frontend does and stamps every token's arrival. Per length, one long request starts on W1, then a short
"other" request on W2; the long one moves W1 -> W2 once to warm W2 up (unmeasured: a worker's first decode
steps at a new context length allocate), then (a) W2 -> W1 multi-stage, (b) W1 -> W2 stop-and-copy,
(c) W2 -> W3 recompute (W3 never saw it). The pause is the longest gap between two consecutive tokens of
the long request around the switch, also in decode steps (its median gap before the move); total is the
migration's own time; slowdown is the "other" request's median gap on its worker (the source of (a)) while
the live stages run (from the migration's start to the pause) over its median gap just before.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import ray

from bench.common import build_random_llama, print_table, write_json
from pdserve import SamplingParams
from pdserve.config import ServeConfig
from pdserve.controller.deploy import build
from pdserve.protocol import EngineRequest

MODEL = Path("/tmp/pdserve-bench/bench-llama-32k")
CONSUMER = "bench-migration"
VOCAB = 1024


class Arrivals:
    """Poll every worker's outbox for CONSUMER; keep (arrival time, token index) per request."""

    def __init__(self, handles) -> None:
        self.seen: dict[str, list[tuple[float, int]]] = {}
        self._tasks = [asyncio.ensure_future(self._poll(h)) for h in handles]

    async def _poll(self, handle) -> None:
        while True:
            deltas = await handle.poll_outputs.remote(0.5, CONSUMER)
            now = time.perf_counter()
            for d in deltas:
                for k in range(len(d.new_token_ids)):
                    self.seen.setdefault(d.request_id, []).append((now, d.index + k))

    def count(self, rid: str) -> int:
        return len({i for _, i in self.seen.get(rid, [])})

    async def until(self, rid: str, n: int, timeout_s: float = 1800) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count(rid) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rid} stuck at {self.count(rid)} tokens")
            await asyncio.sleep(0.002)

    def gaps(self, rid: str, start: float, end: float) -> list[float]:
        """Gaps between consecutive tokens (first arrival of each index) whose later token came in [start, end]."""
        return [b - a for a, b in self.pairs(rid) if start <= b <= end]

    def pairs(self, rid: str) -> list[tuple[float, float]]:
        first: dict[int, float] = {}
        for t, i in self.seen.get(rid, []):
            first.setdefault(i, t)
        times = [first[i] for i in sorted(first)]
        return list(zip(times, times[1:]))

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()


async def measure(arr: Arrivals, rid: str, other: str, source, target_id: str, target, mode: str) -> dict:
    n = arr.count(rid)
    await arr.until(rid, n + 12)
    now = time.perf_counter()
    step = statistics.median(arr.gaps(rid, 0, now)[-10:])
    other_before = statistics.median(arr.gaps(other, now - max(2.0, 20 * step), now) or [float("nan")])
    t0 = time.perf_counter()
    rec = await source.migrate.remote(rid, target_id, target, "bench", mode)
    if rec.outcome != "migrated":
        raise RuntimeError(f"{mode}: {rec}")
    n = arr.count(rid)
    await arr.until(rid, n + 3)
    # the pause: the longest gap around the switch; the live stages ran from t0 until it began
    paused_from, resumed_at = max((p for p in arr.pairs(rid) if p[1] >= t0), key=lambda p: p[1] - p[0])
    pause = resumed_at - paused_from
    during = arr.gaps(other, t0, paused_from)
    return {
        "mode": mode,
        "step_ms": step * 1e3,
        "pause_ms": pause * 1e3,
        "pause_steps": pause / step,
        "total_ms": rec.total_s * 1e3,
        "stages": len(rec.blocks_per_stage),
        "final_blocks": rec.blocks_per_stage[-1],
        "copied_MB": rec.num_bytes / 2**20,
        "other_slowdown": (statistics.median(during) / other_before) if len(during) >= 3 else None,
        "other_gaps_during": len(during),
    }


async def run(lengths: list[int], transport: str) -> list[dict]:
    longest = max(lengths)
    model = MODEL.with_name(f"{MODEL.name}-{longest + 2048}")  # positions are part of the checkpoint
    build_random_llama(
        model, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1024, vocab=VOCAB, max_positions=longest + 2048
    )
    blocks = (longest + 1536) // 16
    cfg = ServeConfig(
        name="bench-migration", engine={"model": str(model), "num_kv_blocks": blocks, "max_num_batched_tokens": 2048,
                "enable_prefix_caching": False},
        pools={"prefill": 0, "decode": 0, "colocated": 3}, kv={"transport": transport},
        migration={"rebalance": False, "stage_timeout_s": 1800}, controller={"metrics_port": 0},
    )  # fmt: skip
    dep = await build(cfg)
    rows = []
    names = sorted(w for w in dep.handles if w.startswith("colocated"))
    (w1, w2, w3), h = names, dep.handles
    arr = Arrivals([h[w] for w in names])
    try:
        for length in lengths:
            rng = random.Random(length)
            long_rid, other_rid = f"long-{length}", f"other-{length}"
            prompt = [rng.randrange(4, VOCAB) for _ in range(length)]
            left = longest + 2048 - length - 1
            params = SamplingParams(temperature=0, max_tokens=min(4000, left), ignore_eos=True)
            other = [rng.randrange(4, VOCAB) for _ in range(64)]
            req = EngineRequest(request_id=long_rid, prompt_token_ids=prompt, params=params, reply_to=CONSUMER)
            await h[w1].generate.remote(req)
            t = time.perf_counter()
            await arr.until(long_rid, 1)
            print(f"{length} tokens: prefilled in {time.perf_counter() - t:.1f} s", flush=True)
            # the other request starts once the long prompt is in, so it is still running at every move
            req = EngineRequest(request_id=other_rid, prompt_token_ids=other, params=params, reply_to=CONSUMER)
            await h[w2].generate.remote(req)
            await arr.until(other_rid, 5)
            # a first move warms W2 up at this context length (its first decode steps there allocate)
            await measure(arr, long_rid, other_rid, h[w1], w2, h[w2], "multi_stage")
            plan = ((w2, w1, "multi_stage"), (w1, w2, "stop_and_copy"), (w2, w3, "recompute"))
            for source, target, mode in plan:
                row = {"context": length, **await measure(arr, long_rid, other_rid, h[source], target, h[target], mode)}
                print(row, flush=True)
                rows.append(row)
            await asyncio.gather(*(h[w].abort.remote([long_rid, other_rid]) for w in names))
    finally:
        arr.stop()
        await dep.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384,32768")
    ap.add_argument("--transport", default="nixl", choices=["nixl", "nccl"])
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    ray.init(num_cpus=6, include_dashboard=False, namespace="pdserve-bench", log_to_driver=False)
    try:
        rows = asyncio.run(run(lengths, args.transport))
    finally:
        ray.shutdown()
    cols = ["context", "mode", "step_ms", "pause_ms", "pause_steps", "total_ms", "stages", "final_blocks", "copied_MB"]
    print_table(rows, cols + ["other_slowdown"])
    multi = {r["context"]: r for r in rows if r["mode"] == "multi_stage"}
    summary = []
    for length in lengths:
        by = {r["mode"]: r for r in rows if r["context"] == length}
        summary.append({
            "context": length,
            "multi_pause_ms": by["multi_stage"]["pause_ms"],
            "stop_copy_over_multi": by["stop_and_copy"]["pause_ms"] / by["multi_stage"]["pause_ms"],
            "recompute_over_multi": by["recompute"]["pause_ms"] / by["multi_stage"]["pause_ms"],
            "multi_flatness_vs_first": by["multi_stage"]["pause_ms"] / multi[lengths[0]]["pause_ms"],
        })  # fmt: skip
    print()
    print_table(summary, list(summary[0]))
    path = write_json("migration", {"model": "bench-llama-32k (32 KiB KV/token)", "transport": args.transport,
                                    "rows": rows, "summary": summary})  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
