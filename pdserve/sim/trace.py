"""Workload traces for the simulator: the Mooncake synthetic trace (rows with prefix block ids) as typed records.

One trace block (512 tokens, one `hash_ids` entry) is one KV block of the simulated engines and the router:
`block_size` tokens (512 for real lengths; smaller scales every prompt down, keeping the hash structure).
Trace hash ids are prefix-consistent (an id always has the same position and parent), so they serve as
block hashes directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
MOONCAKE = TRACES / "mooncake_synthetic_trace.jsonl"
TRACE_BLOCK = 512


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    max_tokens: int
    # the prompt's full blocks only (as RouteRequest carries them): the trace's own ids, opaque keys in the
    # simulator's own index, never mixed with pdserve.hashing's 128-bit hashes
    block_hashes: tuple[int, ...]


def load_mooncake(
    path: Path = MOONCAKE,
    *,
    block_size: int = TRACE_BLOCK,
    time_scale: float = 1.0,
    limit: int | None = None,
    output_scale: float = 1.0,
) -> list[TraceRequest]:
    """Rows in arrival order. Arrival times are multiplied by `time_scale` (< 1 raises the request rate);
    prompt lengths by block_size / 512; output lengths by `output_scale` (at least one token)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            prompt = max(1, math.ceil(row["input_length"] * block_size / TRACE_BLOCK))
            out.append(
                TraceRequest(
                    request_id=f"r{i}",
                    arrival_s=row["timestamp"] / 1000 * time_scale,
                    num_prompt_tokens=prompt,
                    max_tokens=max(1, round(row["output_length"] * output_scale)),
                    block_hashes=tuple(row["hash_ids"][: prompt // block_size]),
                )
            )
    return out


def shared_prefix_trace(
    n: int,
    *,
    block_size: int = 16,
    prefix_blocks: int = 8,
    unique_blocks: int = 6,
    groups: int = 2,
    gap_s: float = 0.05,
) -> list[TraceRequest]:
    """A tiny synthetic trace for tests: request i shares system prompt i % `groups` (`prefix_blocks`
    blocks), then adds `unique_blocks` blocks of its own and 5 more tokens."""
    out = []
    for i in range(n):
        shared = tuple(1_000 * (i % groups + 1) + j for j in range(prefix_blocks))
        own = tuple(10**6 + unique_blocks * i + j for j in range(unique_blocks))
        out.append(TraceRequest(f"t{i}", i * gap_s, (prefix_blocks + unique_blocks) * block_size + 5, 8, shared + own))
    return out


def mean_rate(trace: list[TraceRequest]) -> float:
    """Requests per second over the trace's span."""
    span = trace[-1].arrival_s - trace[0].arrival_s
    return (len(trace) - 1) / span if span > 0 else float("inf")
