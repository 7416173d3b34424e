"""The chaos runs' checked load: greedy completions (streamed and not) whose text must equal an undisturbed
offline run's, and the way each request ended: served exactly, a clean error (an OpenAI error object over
HTTP or as an SSE event, or the connection to a frontend dropped), or lost (a wrong text, or hung)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

MODEL = "pdserve-demo"
PROMPTS = [
    "The quick brown fox",
    "Serving engines batch many requests at once and keep the GPU busy.",
    "Hi",
    "chaos monkeys pull the plug " * 6,  # several KV blocks to hand off
    "a b c d e f g h i j k l m n o p",
    "Disaggregated prefill and decode: one worker computes the prompt, another one streams the answer.",
]
LONG_PROMPT = "a stream long enough to be moved while it runs " * 3
BACKOFF_S = 0.2  # after an error: no hot loop of refusals while the deployment recovers
CONNECTION_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass
class Case:
    prompt: str
    max_tokens: int
    expected: str


def oracle(prompts: list[str], max_tokens: int, long_max_tokens: int) -> tuple[list[Case], Case]:
    """The expected texts, from the offline engine (greedy, ignore_eos: every answer has max_tokens)."""
    from pdserve import LLM, SamplingParams

    llm = LLM(num_kv_blocks=256)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    (long,) = llm.generate([LONG_PROMPT], SamplingParams(temperature=0, max_tokens=long_max_tokens, ignore_eos=True))
    cases = [Case(p, max_tokens, o.text) for p, o in zip(prompts, outs)]
    return cases, Case(LONG_PROMPT, long_max_tokens, long.text)


@dataclass
class Outcome:
    """status: ok | wrong | hung | error (clean) | unclean | left (the client hung up on purpose)."""

    status: str
    detail: str  # the error's kind: http_503, sse_service_unavailable, connection, ...
    frontend: int
    stream: bool | None  # None: not a completion (an admin call)
    latency_s: float
    note: str = ""
    text: str | None = None  # the served text of a wrong answer (for diagnose())


def _error(prefix: str, status: int | None, payload, fe: int, stream: bool, t0: float) -> Outcome:
    """An error answer: clean when it carries an OpenAI error object."""
    err = payload.get("error") if isinstance(payload, dict) else None
    dt = time.monotonic() - t0
    if isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str):
        return Outcome("error", f"{prefix}_{status or err.get('code')}", fe, stream, dt, err["message"][:200])
    return Outcome("unclean", f"{prefix}_{status} without an error object", fe, stream, dt, str(payload)[:200])


async def complete(
    client: httpx.AsyncClient, url: str, fe: int, case: Case, stream: bool, deadline_s: float, *,
    leave_after: int | None = None, on_id: Callable[[str], Awaitable[None]] | None = None, id_after: int = 1,
) -> Outcome:  # fmt: skip
    """One request to frontend `fe`, classified. `leave_after`: close a stream after that many chunks;
    `on_id(id)`: awaited once `id_after` chunks arrived (a migration needs the running request's id)."""
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": case.prompt, "max_tokens": case.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    try:
        return await asyncio.wait_for(_send(client, url, fe, case, body, t0, leave_after, on_id, id_after), deadline_s)
    except asyncio.TimeoutError:
        return Outcome("hung", f"no end within {deadline_s:.0f} s", fe, stream, time.monotonic() - t0)
    except CONNECTION_ERRORS as e:
        return Outcome("error", "connection", fe, stream, time.monotonic() - t0, repr(e)[:200])
    except Exception as e:  # e.g. a 200 whose body is not a completion
        return Outcome("unclean", f"unreadable answer: {type(e).__name__}", fe, stream, time.monotonic() - t0, repr(e))


async def _send(client, url, fe, case, body, t0, leave_after, on_id, id_after) -> Outcome:
    stream = body["stream"]
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        payload = _json(r.content)
        if r.status_code != 200:
            return _error("http", r.status_code, payload, fe, False, t0)
        text = payload["choices"][0]["text"]
        return _check(text, case, fe, False, t0, "")
    chunks, done = [], False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return _error("http", r.status_code, _json(await r.aread()), fe, True, t0)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return _error("sse", None, chunk, fe, True, t0)
            chunks.append("".join(c.get("text", "") for c in chunk.get("choices", [])))
            if len(chunks) == id_after and on_id is not None:
                await on_id(chunk["id"])
            if leave_after is not None and len(chunks) >= leave_after:
                return Outcome("left", "", fe, True, time.monotonic() - t0)
    if not done:  # a stream that ends without [DONE] or an error event is a silent truncation
        return Outcome("unclean", "stream ended without [DONE]", fe, True, time.monotonic() - t0, "".join(chunks))
    return _check("".join(chunks), case, fe, True, t0, "")


def _check(text: str, case: Case, fe: int, stream: bool, t0: float, note: str) -> Outcome:
    dt = time.monotonic() - t0
    if text == case.expected:
        return Outcome("ok", "", fe, stream, dt)
    note = f"{text!r} != {case.expected!r}"
    return Outcome("wrong", "text differs from the offline run", fe, stream, dt, note, text=text)


TIE_NATS = 1e-3  # float32 sums in another order (another batch) move a logit by ~1e-6 relative: far below this


def diagnose(wrong: list[tuple[Case, str]]) -> list[dict]:
    """Why a served text differs from the offline one: at the first token where they part, the offline run's
    log-probabilities of its own token and of the served one. `near_tie`: the served token was the offline
    runner-up by under TIE_NATS, so another batch's float32 rounding can flip the argmax (greedy decoding is
    not batch-invariant); anything else (a token far from the top, a shifted text) points at a real bug."""
    if not wrong:
        return []
    from pdserve import LLM, SamplingParams

    llm = LLM(num_kv_blocks=256)
    out = []
    for case, text in wrong:
        params = SamplingParams(temperature=0, max_tokens=case.max_tokens, ignore_eos=True, logprobs=5)
        (ref,) = llm.generate([case.prompt], params)
        tok = llm.tokenizer
        # the first offline token whose text the served text does not continue (text, not ids: a byte-level
        # tokenizer's partial UTF-8 decodes to U+FFFD, which does not encode back to the same ids)
        at = next((k for k in range(len(ref.token_ids)) if not text.startswith(tok.decode(ref.token_ids[: k + 1]))),
                  None)  # fmt: skip
        row = {"prompt": case.prompt[:60], "max_tokens": case.max_tokens, "diverges_at": at, "near_tie": False}
        if at is not None:
            top = ref.logprobs[at].top  # (token, logprob), best first: which of them the served text continues
            head = ref.token_ids[:at]
            rank = next((i + 1 for i, (t, _) in enumerate(top) if text.startswith(tok.decode(head + [t]))), None)
            gap = None if rank is None else ref.logprobs[at].logprob - top[rank - 1][1]
            tie = rank == 2 and gap is not None and gap < TIE_NATS
            row |= {"offline_token": ref.token_ids[at], "served_token": None if rank is None else top[rank - 1][0],
                    "served_rank": rank, "gap_nats": gap, "near_tie": tie}  # fmt: skip
        out.append(row)
    return out


def _json(content: bytes):
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")


class Load:
    """`concurrency` closed-loop clients, half of them starting on each frontend; a client whose request
    failed on the connection (its frontend died) moves to the next frontend. start() .. pause() is a round."""

    def __init__(self, urls: list[str], cases: list[Case], concurrency: int, seed: int, deadline_s: float) -> None:
        self.urls, self.cases, self.concurrency, self.deadline_s = urls, cases, concurrency, deadline_s
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.outcomes, self._stop = [], asyncio.Event()
        seeds = [self.rng.getrandbits(32) for _ in range(self.concurrency)]
        self._tasks = [asyncio.ensure_future(self._client(i, seeds[i])) for i in range(self.concurrency)]

    async def pause(self) -> list[Outcome]:
        """Stop sending; wait for the requests in flight (each ends by its deadline); this round's outcomes."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    async def _client(self, i: int, seed: int) -> None:
        rng, fe = random.Random(seed), i % len(self.urls)
        async with httpx.AsyncClient(timeout=self.deadline_s + 10) as client:
            while not self._stop.is_set():
                case, stream = rng.choice(self.cases), rng.random() < 0.5
                out = await complete(client, self.urls[fe], fe, case, stream, self.deadline_s)
                self.outcomes.append(out)
                if out.detail == "connection":
                    fe = (fe + 1) % len(self.urls)
                if out.status != "ok":
                    await asyncio.sleep(BACKOFF_S)


async def frontend_metric(urls: list[str], name: str) -> list[float | None]:
    """Per frontend, the sum of a metric's samples (None where the frontend does not answer)."""
    out: list[float | None] = []
    async with httpx.AsyncClient(timeout=5) as client:
        for url in urls:
            try:
                text = (await client.get(f"{url}/metrics")).text
            except httpx.HTTPError:
                out.append(None)
                continue
            out.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)))
    return out


async def retries(urls: list[str]) -> float | None:
    """The frontends' request retries so far (pdserve_request_retries_total), None if one does not answer."""
    values = await frontend_metric(urls, "pdserve_request_retries_total")
    return None if None in values else sum(values)
