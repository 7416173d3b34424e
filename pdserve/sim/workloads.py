"""Traces whose rate changes, scaled to a cluster: the Azure code trace's real arrivals, BurstGPT-style bursts and
a diurnal ramp; no prefix sharing (each request's block hashes are its own). And per-worker capacity estimates."""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime

from pdserve.sim.model import LatencyModel
from pdserve.sim.trace import MOONCAKE, TRACES, TraceRequest

AZURE = TRACES / "azure_llm_code_2023.csv"


def load_azure(path=AZURE) -> list[tuple[float, int, int]]:
    """(seconds since the first request, context tokens, generated tokens), in arrival order."""
    with open(path) as f:
        rows = [(datetime.fromisoformat(r["TIMESTAMP"][:26]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                for r in csv.DictReader(f)]  # fmt: skip
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [((t - t0).total_seconds(), max(1, c), max(1, g)) for t, c, g in rows]


def mooncake_outputs(path=MOONCAKE) -> list[int]:
    with open(path) as f:
        return [max(1, json.loads(line)["output_length"]) for line in f]


@dataclass(frozen=True)
class Lengths:
    """Prompt and output lengths to draw from (independently)."""

    prompts: tuple[int, ...]
    outputs: tuple[int, ...]

    def draw(self, rng: random.Random) -> tuple[int, int]:
        return rng.choice(self.prompts), rng.choice(self.outputs)


def request(i: int, t: float, prompt: int, output: int, block_size: int) -> TraceRequest:
    return TraceRequest(f"r{i}", t, prompt, output, tuple((i << 20) + j for j in range(prompt // block_size)))


def _number(arrivals: list[tuple[float, int, int]], block_size: int) -> list[TraceRequest]:
    arrivals.sort(key=lambda a: a[0])
    return [request(i, t, p, o, block_size) for i, (t, p, o) in enumerate(arrivals)]


def azure_trace(
    rate_scale: float, *, time_scale: float = 1.0, duration_s: float | None = None, jitter_s: float = 1.0,
    seed: int = 0, block_size: int = 512,
) -> list[TraceRequest]:  # fmt: skip
    """The Azure code trace's arrivals (times x `time_scale`), each row repeated `rate_scale` times on average
    (copies land within `jitter_s` after it, with the lengths of a random row), so the pattern keeps its shape
    at `rate_scale` / `time_scale` times the rate. Lengths from the trace's columns."""
    rows, rng, out = load_azure(), random.Random(seed), []
    whole, frac = divmod(rate_scale, 1.0)
    for t, prompt, gen in rows:
        t *= time_scale
        if duration_s is not None and t >= duration_s:
            break
        for k in range(int(whole) + (rng.random() < frac)):
            p, g = (prompt, gen) if k == 0 else rng.choice(rows)[1:]
            out.append((t + (rng.uniform(0, jitter_s) if k else 0.0), p, g))
    return _number(out, block_size)


def poisson_trace(rate, peak: float, duration_s: float, lengths: Lengths, *, seed: int = 0, block_size: int = 512):
    """Arrivals of a Poisson process with rate `rate(t)` <= `peak` (by thinning), lengths drawn from `lengths`."""
    rng, out, t = random.Random(seed), [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return _number(out, block_size)
        if rng.random() * peak < rate(t):
            out.append((t, *lengths.draw(rng)))


def diurnal_rate(low: float, high: float, duration_s: float):
    """One smooth day: `low` at both ends, `high` in the middle."""
    return lambda t: low + (high - low) * (1 - math.cos(2 * math.pi * t / duration_s)) / 2


def burst_rate(low: float, high: float, duration_s: float, *, seed: int = 0):
    """BurstGPT-style: quiet stretches at `low` (gaps of 2-6 min) and bursts of 30-180 s, each at a random
    height between halfway and `high`, rising and falling over 10 s."""
    rng, bursts, t = random.Random(seed + 1), [], 60.0
    while t < duration_s - 60:
        length = rng.uniform(30, 180)
        bursts.append((t, t + length, rng.uniform((low + high) / 2, high)))
        t += length + rng.uniform(120, 360)

    def rate(t: float) -> float:
        for start, end, height in bursts:
            if start - 5 <= t <= end + 5:
                edge = min(1.0, (t - start + 5) / 10, (end + 5 - t) / 10)
                return low + (height - low) * edge
        return low

    return rate


@dataclass(frozen=True)
class Capacity:
    """Requests/s one worker sustains at full load: prefill (compute) and decode (batch or KV bound)."""

    prefill_req_s: float
    decode_req_s: float
    decode_tokens_s: float  # decode tokens/s of one saturated decode worker
    prefill_tokens_s: float


def capacity(model: LatencyModel, prompts, outputs, max_num_seqs: int = 128) -> Capacity:
    p = sum(prompts) / len(prompts)
    o = sum(outputs) / len(outputs)
    budget = model.max_num_batched_tokens
    per_prompt = sum(model.chunk_s(n, 0) + model.prefill_a * n / budget for n in prompts) / len(prompts)
    batch = min(max_num_seqs, model.kv_capacity_tokens / (p + o))
    step = model.decode_a + model.decode_b * batch * (p + o / 2) + model.decode_c * batch
    return Capacity(1 / per_prompt, batch / (o * step), batch / step, p / per_prompt)
