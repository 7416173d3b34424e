"""What the requests carry: token-id prompts of synthetic length mixtures, and rows of the Mooncake and Azure
traces (/work/shared/traces/) scaled for a small machine. Lengths depend on the seed only; token contents also
on a `salt`, so each run of a sweep misses the prefix cache that the runs before it filled."""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the start of the run


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(4, vocab - 4) for _ in range(n)]  # skip the ids where models put special tokens


def synthetic(
    n: int, mix: str, vocab: int, max_len: int, *, seed: int = 0, salt: str = "", spread: float = 0.0
) -> list[Req]:
    """`mix`: WEIGHT:INPUT:OUTPUT,... ; each length drawn uniformly within +-`spread` of its nominal."""
    parts = [tuple(float(x) for x in p.split(":")) for p in mix.split(",")]
    weights = [w for w, _, _ in parts]
    rng, contents = random.Random(seed), random.Random(f"{seed}/{salt}")

    def vary(x: float) -> int:
        return max(1, round(x * rng.uniform(1 - spread, 1 + spread)))

    reqs = []
    for _ in range(n):
        _, i, o = rng.choices(parts, weights)[0]
        out = min(vary(o), max_len - 1)
        reqs.append(Req(tokens(contents, min(vary(i), max_len - out), vocab), out))
    return reqs


def _cap(n: int, max_output: int | None, max_len: int) -> int:
    return max(1, min(n, max_output or n, max_len // 2))


def mooncake(
    n: int, vocab: int, max_len: int, *, block_scale: int, salt: str = "", max_output: int | None = None,
    path: Path = TRACES / "mooncake_synthetic_trace.jsonl",
) -> tuple[list[Req], list[float]]:  # fmt: skip
    """Requests and arrival times (s). Each hash id becomes a fixed random block of `block_scale` tokens (seeded
    by the id), so the trace's prefix sharing survives the scaling (a trace block is 512 tokens)."""
    reqs, times, blocks = [], [], {}
    with open(path) as f:
        for line in f:
            if len(reqs) == n:
                break
            row = json.loads(line)
            out = _cap(row["output_length"], max_output, max_len)
            length = min(math.ceil(row["input_length"] * block_scale / 512), max_len - out)
            prompt = []
            for h in row["hash_ids"]:
                if h not in blocks:
                    blocks[h] = tokens(random.Random(f"{h}/{salt}"), block_scale, vocab)
                prompt += blocks[h]
            reqs.append(Req(prompt[:length], out))
            times.append(row["timestamp"] / 1000)
    return reqs, times


def azure(
    n: int, vocab: int, max_len: int, *, block_scale: int, seed: int = 0, salt: str = "",
    max_output: int | None = None, path: Path = TRACES / "azure_llm_code_2023.csv",
) -> tuple[list[Req], list[float]]:  # fmt: skip
    """Requests and arrival times (s, from the first): context lengths scaled by `block_scale` / 512."""
    reqs, times = [], []
    with open(path) as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i == n:
                break
            out = _cap(int(row["GeneratedTokens"]), max_output, max_len)
            length = min(max(1, math.ceil(int(row["ContextTokens"]) * block_scale / 512)), max_len - out)
            reqs.append(Req(tokens(random.Random(f"{seed}/{salt}/{i}"), length, vocab), out))
            stamp, frac = row["TIMESTAMP"].split(".")
            times.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + frac))
    return reqs, [t - times[0] for t in times]
