"""bench/prefix_routing.py's chat clients: multi-turn chats over shared system prompts, each turn's prompt
the previous prompt plus the server's answer plus a new user message, timed per turn."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from dataclasses import dataclass, field

import httpx

# ---- the chat clients -----------------------------------------------------------------------------------


@dataclass
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    reusable_tokens: int = 0  # block-aligned prefix sent before (own history, or the group's system prompt)
    retries: int = 0
    rejected_because: str = ""  # the last 429's message
    error: str = ""
    answer: list[int] = field(default_factory=list, repr=False)


async def send(client: httpx.AsyncClient, model: str, prompt: list[int], turn: Turn, args) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": args.answer_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    while True:
        start, usage, turn.answer = time.perf_counter(), None, []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 429 and turn.retries < 50:  # back-pressure: wait as told, then again
                turn.retries += 1
                turn.rejected_because = (await r.aread()).decode(errors="replace")[:200]
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                continue
            if r.status_code != 200:
                turn.error = f"{r.status_code} {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    turn.error = str(chunk["error"])[:200]
                    return
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices") or []:
                    if c.get("token_ids") and turn.ttft is None:
                        turn.ttft = time.perf_counter() - start
                    turn.answer += c.get("token_ids") or []
        turn.e2e = time.perf_counter() - start
        turn.prompt_tokens, turn.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        turn.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return


def tokens(seed: tuple, n: int) -> list[int]:
    rng = random.Random(repr(seed))  # a str seed is stable across processes (PYTHONHASHSEED aside)
    return [rng.randrange(4, 256) for _ in range(n)]  # byte tokens (the demo's vocab is 256 bytes + specials)


async def run_chats(url: str, model: str, args) -> tuple[list[Turn], float, str]:
    """Every conversation, `args.concurrency` at a time; returns the turns, the wall time and a digest of
    every prompt sent (equal digests: both servers saw the very same workload)."""
    systems = [tokens(("system", args.seed, g), args.system_tokens) for g in range(args.groups)]
    todo, turns, digest, started = iter(range(args.conversations)), [], hashlib.sha256(), set()
    prompts: dict[tuple[int, int], list[int]] = {}

    async def client(http):
        for c in todo:
            rng = random.Random(repr(("chat", args.seed, c)))
            history = list(systems[c % args.groups])
            reusable = len(history) if c % args.groups in started else 0
            started.add(c % args.groups)
            for k in range(args.turns):
                history += tokens(("user", args.seed, c, k), rng.randint(*args.user_tokens))
                turn = Turn(c, k, reusable_tokens=reusable // 16 * 16)
                await send(http, model, history, turn, args)
                turns.append(turn)
                prompts[c, k] = list(history)
                if turn.error:
                    break
                history += turn.answer
                reusable = len(history)
                if args.think_s:
                    await asyncio.sleep(rng.expovariate(1 / args.think_s))

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    for key in sorted(prompts):
        digest.update(json.dumps(prompts[key]).encode())
    return turns, wall, digest.hexdigest()[:16]
