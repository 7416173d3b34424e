"""Multi-turn chats over shared system prompts (bench/prefix_routing.py's workload): each turn's prompt is the
previous prompt plus the server's answer plus a new user message, in token ids, timed per turn; a 429 is
retried after its Retry-After."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import dataclass, field

from pdserve.load.arrivals import closed_loop
from pdserve.load.client import Client, completion_body
from pdserve.load.outcome import Outcome

MAX_RETRIES = 50


@dataclass
class Turn:
    conversation: int
    turn: int
    reusable_tokens: int = 0  # block-aligned prefix sent before (own history, or the group's system prompt)
    retries: int = 0
    rejected_because: str = ""  # the last 429's message
    outcome: Outcome = field(default_factory=Outcome, repr=False)

    @property
    def error(self) -> str:
        o = self.outcome
        return "" if o.ok else f"{o.error_kind} {o.error}"[:200]

    prompt_tokens = property(lambda self: self.outcome.prompt_tokens or 0)
    cached_tokens = property(lambda self: self.outcome.cached_tokens or 0)
    output_tokens = property(lambda self: self.outcome.output_tokens)
    ttft = property(lambda self: self.outcome.ttft)
    e2e = property(lambda self: self.outcome.e2e)


def tokens(seed: tuple, n: int) -> list[int]:
    rng = random.Random(repr(seed))  # a str seed is stable across processes (PYTHONHASHSEED aside)
    return [rng.randrange(4, 256) for _ in range(n)]  # byte tokens (the demo's vocab is 256 bytes + specials)


async def send(client: Client, body: dict, turn: Turn) -> None:
    while True:
        turn.outcome = await client.send(body)
        if turn.outcome.status == 429 and turn.retries < MAX_RETRIES:  # back-pressure: wait as told, again
            turn.retries += 1
            turn.rejected_because = turn.outcome.error
            await asyncio.sleep(float(turn.outcome.retry_after or 1))
            continue
        return


async def run_chats(url: str, model: str, args) -> tuple[list[Turn], float, str]:
    """Every conversation (`args`: conversations, groups, turns, system_tokens, user_tokens, answer_tokens,
    think_s, concurrency, seed, timeout), `args.concurrency` at a time; returns the turns, the wall time and a
    digest of every prompt sent (equal digests: both servers saw the very same workload)."""
    systems = [tokens(("system", args.seed, g), args.system_tokens) for g in range(args.groups)]
    todo, turns, digest, started = iter(range(args.conversations)), [], hashlib.sha256(), set()
    prompts: dict[tuple[int, int], list[int]] = {}

    async def conversation(http: Client, c: int) -> None:
        rng = random.Random(repr(("chat", args.seed, c)))
        history = list(systems[c % args.groups])
        reusable = len(history) if c % args.groups in started else 0
        started.add(c % args.groups)
        for k in range(args.turns):
            history += tokens(("user", args.seed, c, k), rng.randint(*args.user_tokens))
            turn = Turn(c, k, reusable_tokens=reusable // 16 * 16)
            body = completion_body(model, history, args.answer_tokens, stream=True, return_token_ids=True,
                                   stream_options={"include_usage": True})  # fmt: skip
            await send(http, body, turn)
            turns.append(turn)
            prompts[c, k] = list(history)
            if turn.error:
                break
            history += turn.outcome.token_ids
            reusable = len(history)
            if args.think_s:
                await asyncio.sleep(rng.expovariate(1 / args.think_s))

    async with Client(url, timeout_s=args.timeout) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def step(_: int) -> bool:
            c = next(todo, None)
            if c is None:
                return False
            await conversation(http, c)
            return True

        await closed_loop(args.concurrency, step)
        wall = loop.time() - start
    for key in sorted(prompts):
        digest.update(json.dumps(prompts[key]).encode())
    return turns, wall, digest.hexdigest()[:16]
