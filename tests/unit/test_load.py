"""pdserve.load against a tiny aiohttp server in this process: arrival schedules on a fake clock, the SSE
parser, the client's outcomes (streamed, not, errors, a cut stream, leaving after k chunks), the oracle's
verdicts, summaries, /metrics parsing and the steady load's move to another server after a connection error."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest
from aiohttp import web

from pdserve.live.ports import free_port
from pdserve.load import arrivals
from pdserve.load.client import Client, completion_body
from pdserve.load.metrics import parse, total
from pdserve.load.oracle import Case, detail, verdict
from pdserve.load.outcome import Outcome, counts, percentiles, summarize
from pdserve.load.sse import SSEParser
from pdserve.load.steady import Planned, Steady

# ---- arrivals, on a fake clock


class FakeClock:
    """Time moves only when slept on; every sleep is recorded."""

    def __init__(self) -> None:
        self.t, self.sleeps = 100.0, []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


def test_open_loop_fires_each_request_at_its_time_whatever_the_earlier_ones_do():
    clock, fired, running = FakeClock(), [], []

    def fire(i: int, lag: float):  # called when the request goes out; returns what the task awaits
        fired.append((i, clock.now() - 100.0, lag))
        return hang(i)

    async def hang(i: int) -> int:
        running.append(i)
        await asyncio.Event().wait()  # no request ever ends...
        return i

    async def main():
        task = asyncio.ensure_future(arrivals.open_loop(arrivals.uniform(4.0, 5), fire, clock=clock))
        while len(running) < 5:
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(main())
    assert [(i, t) for i, t, _ in fired] == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]  # ...the rest go
    assert all(lag == 0.0 for _, _, lag in fired) and clock.sleeps == [0.25] * 4


def test_poisson_arrivals_follow_the_seeded_exponential_gaps_and_the_rate():
    rng, t, expect = random.Random(3), 0.0, []
    for _ in range(5):
        t += rng.expovariate(2.0)
        expect.append(t)
    assert list(arrivals.poisson(2.0, seed=3, n=5)) == expect
    many = list(arrivals.poisson(50.0, seed=1, n=20000))
    assert 20000 / many[-1] == pytest.approx(50.0, rel=0.03)


def test_open_loop_reports_how_late_a_request_went_out_and_stops_on_the_event():
    clock, stop, lags = FakeClock(), asyncio.Event(), []

    def fire(i: int, lag: float):
        lags.append(lag)
        clock.t += 0.5  # a stalled client: the next arrivals are already due when it sends again
        if i == 2:
            stop.set()
        return asyncio.sleep(0)

    asyncio.run(arrivals.open_loop(arrivals.uniform(10.0), fire, clock=clock, stop=stop))
    assert lags == pytest.approx([0.0, 0.4, 0.8])


def test_trace_replay_keeps_the_gaps_compressed_and_rescales_to_a_rate():
    times = [10.0, 11.0, 13.0, 16.0]
    assert arrivals.replay(times, 2.0) == [0.0, 0.5, 1.5, 3.0]
    scale = arrivals.scale_to_rate(times, 3.0)  # 3 gaps in 6 s = 0.5/s; to 3/s: compress 6x
    assert scale == pytest.approx(6.0) and arrivals.replay(times, scale)[-1] == pytest.approx(1.0)


def test_closed_loop_clients_each_send_the_next_when_the_last_ended_until_the_source_runs_out():
    clock, log = FakeClock(), []
    take = arrivals.from_list(list("abcdefg"))

    async def step(i: int) -> bool:
        item = take()
        if item is None:
            return False
        log.append((i, item[1], clock.now() - 100.0))
        await clock.sleep(1.0)
        return True

    asyncio.run(arrivals.closed_loop(3, step, clock=clock))
    assert sorted(x for _, x, _ in log) == list("abcdefg")
    assert [sum(1 for c, _, _ in log if c == i) for i in range(3)] == [3, 2, 2]
    # ends at a deadline on the clock: nothing starts after it
    clock2, started = FakeClock(), []

    async def step2(i: int) -> None:
        started.append(clock2.now())
        await clock2.sleep(1.0)

    asyncio.run(arrivals.closed_loop(1, step2, seconds=3.5, clock=clock2))
    assert started == [100.0, 101.0, 102.0, 103.0]


# ---- SSE, outcomes, summaries


def test_sse_parser_takes_events_split_anywhere():
    stream = b'data: {"a": 1}\r\n\r\n: a comment\nevent: x\ndata: two\ndata: lines\n\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        p = SSEParser()
        events = p.feed(stream[:cut]) + p.feed(stream[cut:]) + p.close()
        assert events == ['{"a": 1}', "two\nlines", "[DONE]"], cut
    p = SSEParser()
    assert p.feed(b"data: no blank line at the end") == [] and p.close() == ["no blank line at the end"]


def test_percentiles_match_numpy_and_summaries_count_by_kind():
    xs = [random.Random(i).random() for i in range(101)]
    p = percentiles(xs)
    assert [p["p50"], p["p90"], p["p99"], p["p99.9"]] == pytest.approx(np.percentile(xs, [50, 90, 99, 99.9]))
    assert p["max"] == max(xs) and p["mean"] == pytest.approx(np.mean(xs))
    assert percentiles([])["p50"] is None
    outs = [Outcome(kind="ok", ttft=0.1, e2e=1.1, output_tokens=11, chunks=11, itl=[0.1] * 10),
            Outcome(kind="http", status=429), Outcome(kind="http", status=429), Outcome(kind="dropped")]  # fmt: skip
    assert counts(outs) == {"ok": 1, "429": 2, "dropped": 1}
    s = summarize(outs, 2.0)
    assert (s["ok"], s["failed"], s["request_throughput"], s["output_throughput"]) == (1, 3, 0.5, 5.5)
    assert s["tpot"]["p50"] == pytest.approx(0.1) and s["itl"]["max"] == pytest.approx(0.1)


def test_the_oracle_says_served_wrong_hung_clean_or_unclean():
    case = Case("p", 3, "abc")
    assert verdict(Outcome(kind="ok", text="abc"), case) == "ok"
    assert verdict(Outcome(kind="ok", text="abd"), case) == "wrong"
    assert verdict(Outcome(kind="timeout"), case) == "hung"
    assert verdict(Outcome(kind="left"), case) == "left"
    clean = Outcome(kind="http", status=503, error_object=True)
    assert verdict(clean, case) == "error" and detail(clean) == "http_503"
    assert verdict(Outcome(kind="http", status=502), case) == "unclean"
    assert verdict(Outcome(kind="eof"), case) == "unclean"
    assert verdict(Outcome(kind="dropped"), case) == "error" and detail(Outcome(kind="no_response")) == "connection"


def test_metrics_text_parses_to_samples_and_sums_by_label():
    text = '# TYPE r counter\nr_total{cause="a"} 2\nr_total{cause="b"} 3\n# TYPE g gauge\ng 7\n'
    s = parse(text)
    assert s[("g", ())] == 7 and total(s, "r_total") == 5 and total(s, "r_total", cause="b") == 3


# ---- the client, against a tiny server


class Tiny:
    """A fake OpenAI completions server: the prompt says what to do."""

    def __init__(self) -> None:
        self.left = asyncio.Event()  # a stream's client went away before its end

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt, n = body["prompt"], body["max_tokens"]
        if prompt == "busy":
            err = {"error": {"message": "too many", "type": "overloaded", "code": 429}}
            return web.json_response(err, status=429, headers={"Retry-After": "2"})
        if prompt == "broken":
            return web.Response(status=500, text="oops")
        if not body.get("stream"):
            choice = {"index": 0, "text": "x" * n, "token_ids": [7] * n}
            return web.json_response({"id": "cmpl-1", "choices": [choice],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": n}})  # fmt: skip
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)
        try:
            for i in range(n):
                if prompt == "sse-error" and i == 2:
                    err = {"error": {"message": "it broke", "type": "internal", "code": "generation_failed"}}
                    await r.write(f"data: {json.dumps(err)}\n\n".encode())
                    return r
                chunk = {"id": "cmpl-2", "choices": [{"index": 0, "text": "ab", "token_ids": [i, i]}]}
                await r.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(0.01 if prompt == "slow" else 0)
            if prompt == "cut":
                return r  # ends without [DONE]
            usage = {"id": "cmpl-2", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2 * n}}
            await r.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            self.left.set()
            raise
        return r


async def _serve(tiny: Tiny) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", tiny.completions)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _run(scenario):
    async def main():
        tiny = Tiny()
        runner, url = await _serve(tiny)
        try:
            return await scenario(tiny, url)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_the_client_reads_streams_and_plain_answers_into_one_outcome():
    async def scenario(tiny, url):
        async with Client(url) as c:
            return (await c.send(completion_body("m", "p", 4, stream=True)), await c.send(completion_body("m", "p", 4)))

    streamed, plain = _run(scenario)
    assert streamed.kind == "ok" and streamed.text == "ab" * 4 and streamed.token_ids == [0, 0, 1, 1, 2, 2, 3, 3]
    assert streamed.output_tokens == 8 and streamed.prompt_tokens == 3 and streamed.chunks == 4
    assert streamed.request_id == "cmpl-2" and len(streamed.itl) == 6  # 3 gaps, each over 2 tokens
    assert streamed.ttft is not None and streamed.ttft <= streamed.e2e and streamed.tpot is not None
    assert plain.kind == "ok" and plain.text == "xxxx" and plain.output_tokens == 4 and plain.request_id == "cmpl-1"


def test_the_client_classifies_errors():
    async def scenario(tiny, url):
        async with Client(url) as c:
            prompts = ("busy", "broken", "sse-error", "cut")
            outs = [await c.send(completion_body("m", p, 5, stream=True)) for p in prompts]
        async with Client(f"http://127.0.0.1:{free_port()}") as dead:  # nothing listens there
            outs.append(await dead.send(completion_body("m", "p", 1)))
        return outs

    busy, broken, sse, cut, dead = _run(scenario)
    assert (busy.kind, busy.status, busy.retry_after, busy.error_object, busy.error) == ("http", 429, "2", True,
                                                                                       "too many")  # fmt: skip
    assert (broken.kind, broken.status, broken.error_object) == ("http", 500, False)
    assert (sse.kind, sse.error_code, sse.text) == ("sse", "generation_failed", "abab")
    assert cut.kind == "eof" and cut.text == "ab" * 5
    assert dead.kind == "no_response" and dead.status == 0


def test_leaving_after_k_chunks_closes_the_stream_and_the_server_sees_the_client_go():
    async def scenario(tiny, url):
        seen = []

        async def on_chunk(n: int, chunk: dict) -> None:
            seen.append((n, chunk["id"]))

        async with Client(url) as c:
            out = await c.send(completion_body("m", "slow", 1000, stream=True), leave_after=3, on_chunk=on_chunk)
        await asyncio.wait_for(tiny.left.wait(), 60)  # a guard against a hang, not a bound on time
        return out, seen

    out, seen = _run(scenario)
    assert out.kind == "left" and out.chunks == 3 and out.text == "ab" * 3
    assert seen == [(1, "cmpl-2"), (2, "cmpl-2"), (3, "cmpl-2")]


def test_a_deadline_ends_a_request_as_timeout():
    async def scenario(tiny, url):
        async with Client(url) as c:
            return await c.send(completion_body("m", "slow", 100000, stream=True), deadline_s=0.2)

    out = _run(scenario)
    assert out.kind == "timeout" and out.chunks > 0


def test_a_steady_load_moves_to_the_next_server_after_a_connection_error():
    async def scenario(tiny, url):
        dead = f"http://127.0.0.1:{free_port()}"
        load = Steady([dead, url], 1, lambda i, k: Planned(completion_body("m", "p", 2), tag=k), backoff_s=0)
        load.start()
        while not any(o.ok for o in load.outcomes):
            await asyncio.sleep(0.01)
        return await load.stop()

    outs = _run(scenario)
    assert outs[0].kind == "no_response"
    assert all(o.ok for o in outs[1:]) and {o.url for o in outs[1:]} == {outs[1].url} != {outs[0].url}
    assert [o.tag for o in outs] == list(range(len(outs)))
