"""Chaos rounds on a live deployment: a load whose every answer is checked against an offline run
(pdserve.load), one fault (pdserve.live.faults) a round, and after each round the invariants: nothing lost
or hung, back at its target size, no KV block held once the load is drained. Used by bench/chaos.py (long
runs), bench/soak.py (its drain check) and tests/e2e/test_chaos.py."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

from pdserve.live.faults import ADMIN, MODEL, Faults, at_target, ready, retries
from pdserve.load.client import completion_body
from pdserve.load.metrics import scrape_all, total
from pdserve.load.oracle import Case, detail, verdict
from pdserve.load.outcome import CONNECTION, Outcome
from pdserve.load.steady import Planned, Steady

BACKOFF_S = 0.2  # after an error: no hot loop of refusals while the deployment recovers


@dataclass
class Settings:
    interval_s: float = 20.0  # a round's load, from its start (the fault comes `warm_s` in)
    warm_s: float = 1.0
    deadline_s: float = 60.0  # a request not ended by then is hung
    recover_s: float = 120.0  # back at full strength within this, or the round fails
    leak_s: float = 30.0  # no KV block held within this once the load is drained
    hang_s: float = 5.0  # SIGSTOP to SIGCONT
    concurrency: int = 4
    disconnects: int = 4  # streams opened and left by `client_disconnect`


@dataclass
class Checked:
    """A request's verdict (pdserve.load.oracle.VERDICTS) and what it says about the round."""

    verdict: str
    detail: str
    frontend: int | None
    completion: bool  # False: an admin call
    latency_s: float
    note: str = ""


class Chaos:
    """Runs rounds on a started deployment; `round(number, kind)` returns the round's record with its
    violations. The load: `concurrency` closed-loop clients, half starting on each frontend, each request a
    random case, streamed or not."""

    def __init__(self, dep, urls: list[str], cases: list[Case], long_case: Case, settings: Settings, seed: int):
        self.dep, self.name, self.urls, self.cases, self.s = dep, dep.config.name, urls, cases, settings
        self.faults = Faults(dep, urls, long_case, seed=seed, hang_s=settings.hang_s, recover_s=settings.recover_s,
                             deadline_s=settings.deadline_s, disconnects=settings.disconnects)  # fmt: skip
        self.rng = random.Random(seed)
        self.load: Steady | None = None
        self._rngs: list[random.Random] = []

    async def status(self, timeout_s: float = 5.0) -> dict | None:
        return await self.faults.status(timeout_s)

    def _plan(self, i: int, k: int) -> Planned:
        rng = self._rngs[i]
        case, stream = rng.choice(self.cases), rng.random() < 0.5
        return Planned(completion_body(MODEL, case.prompt, case.max_tokens, stream=stream), case)

    def start_load(self) -> None:
        self._rngs = [random.Random(self.rng.getrandbits(32)) for _ in range(self.s.concurrency)]
        self.load = Steady(self.urls, self.s.concurrency, self._plan, deadline_s=self.s.deadline_s,
                           backoff_s=BACKOFF_S).start()  # fmt: skip

    async def round(self, number: int, kind: str) -> dict:
        """Load, the fault `warm_s` in, back at full strength, load until `interval_s`, drain, check."""
        start, f = time.monotonic(), self.faults
        f.reset()
        retries0 = await retries(self.urls)
        self.start_load()
        await asyncio.sleep(self.s.warm_s)
        st, violations = await self.status(30), []
        if not at_target(st, len(self.urls)):
            violations.append(f"not at full strength before the fault: {_strength(st)}")
        fault = None
        try:
            fault = await getattr(f, kind)(st) if st is not None else None
        except Exception as e:  # e.g. no ready worker of the role to pick: the round fails, the run goes on
            violations.append(f"{kind} could not be injected: {e!r}")
        if fault is not None and not fault.fired:
            violations.append(f"{kind} did not take effect: {fault.victim}")
        seen_gone = fault is not None and (fault.gone is None or await f.wait(fault.gone, self.s.recover_s))
        full = seen_gone and await f.wait(lambda s: at_target(s, len(self.urls)), self.s.recover_s)
        recovered_s = time.monotonic() - fault.at if full else None
        if not full:
            now = _strength(await self.status())
            violations.append(f"not back at full strength within {self.s.recover_s:.0f} s: {now}")
        await asyncio.sleep(max(0.0, self.s.interval_s - (time.monotonic() - start)))
        outcomes = await self.load.stop() + f.extra
        leaks = await self.leaks()
        retries1 = await retries(self.urls)
        record = {
            "round": number, "fault": kind, "victim": fault.victim if fault else "(no status: not injected)",
            "fired": bool(fault and fault.fired), "recovered_s": recovered_s, "round_s": time.monotonic() - start,
            "retries": None if None in (retries0, retries1) else max(0, int(retries1 - retries0)),
        }  # fmt: skip
        return self._check(record, [self.classify(o) for o in outcomes], leaks, violations)

    def classify(self, o: Outcome) -> Checked:
        """The oracle's verdict; a connection error is clean only from a frontend this round killed."""
        fe = self.urls.index(o.url) if o.url in self.urls else None
        if o.tag == ADMIN:
            return Checked("unclean", "admin call", fe, False, o.e2e or 0.0, o.error)
        v, d, note = verdict(o, o.tag), detail(o), o.error
        if o.kind in CONNECTION and fe not in self.faults.killed_frontends:
            v, d = "unclean", "connection error on a live frontend"
        if v == "wrong":
            d, note = "text differs from the offline run", f"{o.text!r} != {o.tag.expected!r}"
        return Checked(v, d, fe, True, o.e2e or 0.0, note)

    def _check(self, record: dict, checked: list[Checked], leaks: list[str], violations: list[str]) -> dict:
        done = [c for c in checked if c.completion]
        count = Counter(c.verdict for c in done)
        lost = [c for c in checked if c.verdict in ("wrong", "hung")]
        unclean = [c for c in checked if c.verdict == "unclean"]
        leaked = sum(held_blocks(r) for r in leaks)
        if lost:
            violations.append(f"{len(lost)} lost: {[f'{c.verdict} {c.detail} {c.note}' for c in lost[:3]]}")
        if unclean:
            violations.append(f"{len(unclean)} unclean endings: {[f'{c.detail} {c.note}' for c in unclean[:3]]}")
        if leaks:
            violations.append(f"held after the drain ({leaked} KV blocks): {leaks[:3]}")
        return {
            **record, "requests": len(done), "served": count["ok"], "errors": count["error"], "lost": len(lost),
            "unclean": len(unclean), "left": count["left"], "leaked_blocks": leaked, "leaks": leaks,
            "slowest_s": max((c.latency_s for c in done), default=None),
            "error_kinds": dict(Counter(c.detail for c in done if c.verdict == "error")), "violations": violations,
        }  # fmt: skip

    async def leaks(self) -> list[str]:
        """What the ready workers still hold, and requests the frontends still count as running (admission
        slots), polled until nothing (or `leak_s`)."""
        deadline = time.monotonic() + self.s.leak_s
        while True:
            st, reports = await self.status(), []
            running = [None if s is None else total(s, "pdserve_num_requests_running") for s in
                       await scrape_all(self.urls)]  # fmt: skip
            reports += [f"frontend-{i}: {n:.0f} requests running" for i, n in enumerate(running) if n]
            for w in ready(st) if st else []:
                try:
                    report = await asyncio.wait_for(
                        asyncio.ensure_future(self.faults.worker(w["worker_id"]).leak_report.remote()), 10
                    )
                except Exception:  # died meanwhile: the next status shows it
                    continue
                if report:
                    reports.append(f"{w['worker_id']}: {report}")
            if st is not None and not reports:
                return []
            if time.monotonic() > deadline:
                return reports or ["the controller did not answer"]
            await asyncio.sleep(0.5)


def _strength(st: dict | None) -> dict | None:
    if st is None:
        return None
    return {
        "targets": st["targets"],
        "workers": {w["worker_id"]: w["state"] for w in st["workers"] if w["state"] != "dead"},
        "frontends": {f["index"]: f["state"] for f in st["frontends"]},
    }


def held_blocks(report: str) -> int:
    m = re.search(r"\((\d+) in all\)", report)
    return int(m.group(1)) if m else 0
