"""The oracle plug-in: what a checked load expects of each request (`Case`: the prompt, and the text an offline
greedy run gave), and the verdict on an outcome. The offline run itself is the caller's (it needs the engine,
which this package does not import); `bench/oracle.py` makes it with `pdserve.LLM`."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.load.outcome import CONNECTION, Outcome

# The verdicts. A checked load counts requests by these.
VERDICTS = {
    "ok": "the offline text, exactly",
    "wrong": "a 200 with another text",
    "hung": "no end within the deadline",
    "error": "a clean error: an OpenAI error object over HTTP or SSE, or the connection failed",
    "unclean": "any other ending: an error without an error object, a stream cut without [DONE], a bad body",
    "left": "the client closed the stream on purpose",
}


@dataclass(frozen=True)
class Case:
    prompt: str | list[int]
    max_tokens: int
    expected: str  # the offline greedy text (ignore_eos: max_tokens tokens)


def verdict(out: Outcome, case: Case) -> str:
    """One of VERDICTS. A connection failure counts as a clean error here; a caller that knows the server was
    alive (not killed) makes it unclean."""
    if out.kind == "ok":
        return "ok" if out.text == case.expected else "wrong"
    if out.kind == "timeout":
        return "hung"
    if out.kind == "left":
        return "left"
    if out.kind in CONNECTION:
        return "error"
    if out.kind in ("http", "sse") and out.error_object:
        return "error"
    return "unclean"


def detail(out: Outcome) -> str:
    """A short name for how a request that was not served ended: http_503, sse_service_unavailable,
    connection, ... ("" when it was)."""
    if out.kind == "http":
        return f"http_{out.status}" + ("" if out.error_object else " without an error object")
    if out.kind == "sse":
        return f"sse_{out.error_code or None}" + ("" if out.error_object else " without an error object")
    if out.kind in CONNECTION:
        return "connection"
    return {"ok": "", "left": "", "timeout": out.error, "eof": "stream ended without [DONE]"}.get(
        out.kind, f"unreadable answer: {out.error[:80]}"
    )
