"""The record of one HTTP request under load (`Outcome`: how it ended, its timings, its answer) and the
summaries over many: percentiles, counts by kind, the latency and throughput table the benchmarks print."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# How a request ended (`Outcome.kind`). Every request gets exactly one.
KINDS = {
    "ok": "a 200 with a whole answer (a stream: ended by [DONE])",
    "http": "an answer with a status other than 200 (`status`, and the OpenAI error object if any)",
    "sse": "a stream that carried an error event",
    "eof": "a stream that ended without [DONE] or an error event (a silent truncation)",
    "no_response": "no HTTP answer: the connection failed or dropped before the status line",
    "dropped": "the connection dropped after the status line (mid-stream)",
    "timeout": "no end within the request's deadline",
    "left": "the client closed the stream on purpose (`leave_after` chunks)",
    "unreadable": "a 200 whose body is not a completion",
}
CONNECTION = ("no_response", "dropped")  # the connection itself failed (a killed server, say)


@dataclass
class Outcome:
    """One request. Times are seconds (`time.perf_counter`); `itl` spreads each chunk's gap over the tokens it
    carries. `tag` is the caller's (a case, a frontend index); the client never reads it."""

    kind: str = ""
    status: int = 0  # HTTP status; 0: none
    error: str = ""  # the error's message (or the exception), at most 300 characters
    error_code: str = ""  # the OpenAI error object's code, else its type ("" without one)
    error_object: bool = False  # the error came as a well-formed OpenAI error object (message and type)
    retry_after: str | None = None
    t_send: float = 0.0  # perf_counter when it was sent
    send_lag: float = 0.0  # how late the arrival schedule sent it (a stalled client shows here)
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # stream chunks with content
    output_tokens: int = 0  # usage.completion_tokens when the server sent usage, else the tokens counted
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    request_id: str = ""
    url: str = ""  # the server it was sent to
    tag: Any = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def error_kind(self) -> str:
        """The HTTP status for an `http` ending, else the kind ("" when ok)."""
        return "" if self.ok else str(self.status) if self.kind == "http" else self.kind

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentiles(values: Iterable[float | None], qs: Sequence[float] = (50, 90, 99, 99.9)) -> dict:
    """p50/p90/p99/p99.9 (linear interpolation, as numpy's default), max and mean; None for an empty sample."""
    xs = sorted(v for v in values if v is not None)
    keys = [f"p{q:g}" for q in qs]
    if not xs:
        return dict.fromkeys([*keys, "max", "mean"])
    out = {}
    for key, q in zip(keys, qs):
        pos = (len(xs) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[key] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out | {"max": xs[-1], "mean": sum(xs) / len(xs)}


def counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Requests by how they ended: `ok`, `left`, an HTTP status (`429`), or the kind (`sse`, `dropped`...)."""
    return dict(Counter(o.error_kind or "ok" for o in outcomes))


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> dict:
    """Counts, throughput and latency percentiles over the successful requests."""
    ok = [o for o in outcomes if o.ok]
    tokens = sum(o.output_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "by_kind": counts(outcomes),
        "errors": sorted({f"{o.status} {o.error}"[:120] for o in outcomes if not o.ok and o.kind != "left"})[:5],
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else None,
        "output_throughput": tokens / duration_s if duration_s else None,
        "ttft": percentiles(o.ttft for o in ok),
        "itl": percentiles(g for o in ok for g in o.itl),
        "max_itl": percentiles(max(o.itl) for o in ok if o.itl),  # each request's worst stall
        "tpot": percentiles(o.tpot for o in ok),
        "e2e": percentiles(o.e2e for o in ok),
        "tokens_per_chunk": tokens / max(1, sum(o.chunks for o in ok)),
        "max_send_lag_s": max((o.send_lag for o in outcomes), default=0.0),
    }
