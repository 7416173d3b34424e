"""A steady greedy load for deployment tests through an engine client (`client.generate`, no HTTP: the HTTP
load is pdserve.load's): a few closed-loop clients (pdserve.load.arrivals) stream fixed prompts until
stopped; every outcome is kept, so a test can check each completed output against an undisturbed run and
count the clean errors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pdserve import LLM, SamplingParams
from pdserve.engine_client import Overloaded, ServiceUnavailable
from pdserve.load.arrivals import closed_loop

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# lengths past the decider's 64-token local-prefill threshold, so prompts are disaggregated
PROMPTS = [[(7 * i + 3 * j) % 250 for i in range(70 + 17 * j)] for j in range(8)]

_reference: list[list[int]] = []


def reference() -> list[list[int]]:
    """Each prompt alone on a fresh engine: the undisturbed output."""
    if not _reference:
        llm = LLM(num_kv_blocks=512, enable_prefix_caching=False)
        _reference.extend(o.token_ids for o in llm.generate(PROMPTS, GREEDY))
    return _reference


@dataclass
class Load:
    client: object
    concurrency: int = 4
    done: list[tuple[int, list[int]]] = field(default_factory=list)  # (prompt index, tokens)
    errors: list[BaseException] = field(default_factory=list)  # clean errors: 503 / 429 kinds
    crashes: list[BaseException] = field(default_factory=list)  # anything else
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Future | None = None
    _n: int = 0

    def start(self) -> Load:
        self._task = asyncio.ensure_future(closed_loop(self.concurrency, self._one, stop=self._stop))
        return self

    async def _one(self, k: int) -> None:
        self._n += 1
        i = self._n % len(PROMPTS)
        tokens: list[int] = []
        try:
            async for d in self.client.generate(f"load-{k}-{self._n}", PROMPTS[i], GREEDY):
                tokens += d.new_token_ids
            self.done.append((i, tokens))
        except (ServiceUnavailable, Overloaded) as e:
            self.errors.append(e)
            await asyncio.sleep(0.2)
        except Exception as e:  # a bug: reported by check()
            self.crashes.append(e)

    async def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, timeout_s)

    def completed_since(self, t: int) -> int:
        return len(self.done) - t

    def check(self) -> None:
        """No crash, and every completed output equals the undisturbed one, token for token."""
        assert not self.crashes, f"requests crashed: {self.crashes[:3]}"
        ref = reference()
        wrong = [(i, toks) for i, toks in self.done if toks != ref[i]]
        assert not wrong, f"{len(wrong)} of {len(self.done)} outputs differ from the undisturbed run: {wrong[:2]}"
