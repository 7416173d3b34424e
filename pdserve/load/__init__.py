"""HTTP load for benchmarks and tests: arrivals, request bodies, one aiohttp client, one outcome record, plug-ins
(oracle check, cancellation, /metrics scraping) and the summaries. Imports no torch and no Ray: the process
generating the load is never a serving process.

    arrivals  when requests go out: closed loop (N clients), open loop at given times (Poisson, uniform, trace)
    bodies    what they carry: synthetic token prompts, Mooncake / Azure trace rows, OpenAI bodies
    chats     multi-turn chats over shared system prompts (each turn's prompt: history + answer + message)
    client    one aiohttp session: a completion or chat request, streamed (SSE) or not, -> Outcome
    outcome   the record of one request, percentiles and summaries
    oracle    checks an outcome against an offline greedy answer
    metrics   Prometheus text from /metrics: parse, sum, sample at an interval
    steady    closed-loop clients until stopped, awaited or in a thread of their own
"""

from pdserve.load.arrivals import RealClock, closed_loop, open_loop, poisson, replay, uniform
from pdserve.load.client import Client, completion_body, get_json
from pdserve.load.outcome import Outcome, counts, percentiles, summarize

__all__ = [
    "Client",
    "Outcome",
    "RealClock",
    "closed_loop",
    "completion_body",
    "counts",
    "get_json",
    "open_loop",
    "percentiles",
    "poisson",
    "replay",
    "summarize",
    "uniform",
]
