"""Latency model of one worker: engine step time, KV capacity and KV transfer time, loaded from a calibration.

A step computes prefill chunks (n new tokens after s already in the cache) and one token for each of B
decoding sequences holding C context tokens in all; the costs add, with one fixed overhead per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALIBRATIONS = {"cpu": HERE / "calibration_cpu.json", "h100": HERE / "calibration_h100.json"}


@dataclass(frozen=True)
class LatencyModel:
    name: str
    prefill_a: float
    prefill_b: float
    prefill_c: float
    prefill_d: float
    decode_a: float
    decode_b: float
    decode_c: float
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_num_batched_tokens: int
    transfer_bytes_per_s: float
    transfer_overhead_s: float
    # where the figures come from, "measured: <command> on <machine>, <date>" or "derived: <which model>"
    provenance: str = "unstated"

    @classmethod
    def from_json(cls, data: dict) -> LatencyModel:
        p, d = data["prefill"], data["decode"]
        return cls(
            name=data["name"],
            prefill_a=p["a"],
            prefill_b=p["b"],
            prefill_c=p["c"],
            prefill_d=p["d"],
            decode_a=d["a"],
            decode_b=d["b"],
            decode_c=d["c"],
            kv_bytes_per_token=data["kv_bytes_per_token"],
            kv_capacity_tokens=data["kv_capacity_tokens"],
            max_num_batched_tokens=data["max_num_batched_tokens"],
            transfer_bytes_per_s=data["transfer_bytes_per_s"],
            transfer_overhead_s=data["transfer_overhead_s"],
            provenance=provenance(data),
        )

    def chunk_s(self, new: int, context: int) -> float:
        """Variable cost of computing `new` prompt tokens after `context` tokens already in the cache."""
        return new * (self.prefill_b + self.prefill_c * new + self.prefill_d * context)

    def step_s(self, chunks: float, batch: int, context_tokens: int) -> float:
        """One engine step: `chunks` = summed `chunk_s` of its prefill work, plus `batch` decode tokens."""
        if not batch:
            return self.prefill_a + chunks
        overhead = max(self.prefill_a, self.decode_a) if chunks else self.decode_a
        return overhead + chunks + self.decode_b * context_tokens + self.decode_c * batch

    def decode_run_s(self, steps: int, batch: int, context_tokens: int) -> float:
        """Time for `steps` decode-only steps of a fixed batch whose context grows by `batch` per step."""
        per_step = self.decode_a + self.decode_c * batch + self.decode_b * context_tokens
        return steps * per_step + self.decode_b * batch * steps * (steps - 1) / 2

    def prefill_s(self, new: int, cached: int = 0) -> float:
        """An uncontended prefill of `new` tokens after `cached` ones, in chunks of the step budget."""
        total, done, chunk = 0.0, 0, self.max_num_batched_tokens
        while done < new:
            n = min(chunk, new - done)
            total += self.prefill_a + self.chunk_s(n, cached + done)
            done += n
        return total

    def transfer_s(self, tokens: int) -> float:
        return self.transfer_overhead_s + tokens * self.kv_bytes_per_token / self.transfer_bytes_per_s


def provenance(data: dict) -> str:
    """A calibration's `provenance`; for a file without one, its `kind` and `source`, or that it says nothing."""
    if data.get("provenance"):
        return data["provenance"]
    if data.get("kind") or data.get("source"):
        return f"{data.get('kind', 'unstated')}: {data.get('source', 'no source given')}"
    return "unstated: the calibration file says neither how it was measured nor what it was derived from"


def load_model(name: str) -> LatencyModel:
    path = CALIBRATIONS.get(name, Path(name))
    return LatencyModel.from_json(json.loads(path.read_text()))
