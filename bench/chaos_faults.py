"""Chaos rounds against a live deployment: a load whose every answer is checked against an offline run, one
fault at a time, and after each round the invariants (nothing lost or hung, back at its target size, no KV
block held once the load is drained). Shared by bench/chaos.py (long runs) and tests/e2e/test_chaos.py."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import ray
from chaos_load import CONNECTION_ERRORS, Case, Load, Outcome, complete, frontend_metric, retries

from pdserve.config import NAMESPACE, ROLES, worker_actor_name

FAULTS = (
    "kill_worker", "kill_frontend", "kill_controller", "hang_worker", "hang_frontend", "hang_controller",
    "fail_transfer", "client_disconnect", "scale_in", "migrate",
)  # fmt: skip
POLL_S = 0.2
FIRE_WAIT_S = 20.0  # fail_transfer: a handoff or a migration into the worker comes within this


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


def _ready(st: dict, role: str | None = None) -> list[dict]:
    return [w for w in st["workers"] if w["state"] == "ready" and role in (None, w["role"])]


def at_target(st: dict | None, frontends: int) -> bool:
    """Ready workers per role == the targets, none draining or starting, every frontend ready."""
    if st is None:
        return False
    ready = Counter(w["role"] for w in _ready(st))
    busy = [w for w in st["workers"] if w["state"] in ("starting", "draining")]
    fronts = [f for f in st["frontends"] if f["state"] == "ready"]
    return all(ready[r] == st["targets"].get(r, 0) for r in ROLES) and not busy and len(fronts) == frontends


def _worker_gone(worker_id: str):
    return lambda st: all(w["state"] == "dead" for w in st["workers"] if w["worker_id"] == worker_id)


def _kill(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # gone already
        pass


@dataclass
class Injected:
    victim: str
    gone: Callable[[dict], bool] | None = None  # true once the status shows the victim gone
    fired: bool = True  # the fault took effect (a KV transfer failed, the smaller size was reached...)
    at: float = field(default_factory=time.monotonic)  # when it hit: the recovery time runs from here


class Chaos:
    """Runs rounds on a started deployment; `round(kind)` returns the round's record with its violations."""

    def __init__(self, dep, urls: list[str], cases: list[Case], long_case: Case, settings: Settings, seed: int):
        self.dep, self.controller, self.name = dep, dep.controller, dep.config.name
        self.urls, self.cases, self.long_case, self.s = urls, cases, long_case, settings
        self.rng = random.Random(seed)
        self.load = Load(urls, cases, settings.concurrency, seed, settings.deadline_s)
        self.killed_frontends: set[int] = set()  # this round's: connection errors there are expected
        self.extra: list[Outcome] = []  # this round's requests made by the faults themselves
        self.headers = {"Authorization": f"Bearer {dep.config.frontend.admin_keys[0]}"}

    async def status(self, timeout_s: float = 5.0) -> dict | None:
        """The controller's status, or None while it does not answer (restarting)."""
        try:
            return await asyncio.wait_for(asyncio.ensure_future(self.controller.status.remote()), timeout_s)
        except Exception:
            return None

    async def wait(self, predicate, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = await self.status()
            if st is not None and predicate(st):
                return True
            await asyncio.sleep(POLL_S)
        return False

    # ---- faults ------------------------------------------------------------------------------------------------
    async def kill_worker(self, st: dict, role: str | None = None) -> Injected:
        w = self.rng.choice(_ready(st, role))
        _kill(w["pid"])
        return Injected(w["worker_id"], _worker_gone(w["worker_id"]))

    async def kill_frontend(self, st: dict) -> Injected:
        f = self.rng.choice([f for f in st["frontends"] if f["state"] == "ready"])
        self.killed_frontends.add(f["index"])
        _kill(f["pid"])
        gone = lambda s: all(g["pid"] != f["pid"] for g in s["frontends"] if g["index"] == f["index"])  # noqa: E731
        return Injected(f"frontend-{f['index']}", gone)

    async def kill_controller(self, st: dict) -> Injected:
        pid = st["controller"]["pid"]
        _kill(pid)
        return Injected("controller", lambda s: s["controller"]["pid"] != pid)

    async def hang_worker(self, st: dict) -> Injected:
        """SIGSTOP for `hang_s` (past the heartbeat timeout), then SIGCONT: declared dead and replaced, or
        serving again; requests are never left waiting on it (the load's deadline)."""
        w = self.rng.choice(_ready(st))
        at = time.monotonic()
        _kill(w["pid"], signal.SIGSTOP)
        try:
            await asyncio.sleep(self.s.hang_s)
        finally:
            _kill(w["pid"], signal.SIGCONT)
        after = await self.status()
        dead = after is not None and _worker_gone(w["worker_id"])(after)
        return Injected(f"{w['worker_id']} ({'declared dead' if dead else 'recovered'})", at=at)

    async def hang_frontend(self, st: dict) -> Injected:
        """SIGSTOP a frontend and leave it stopped: the controller's pings go unanswered, it kills it and
        starts a replacement (clients of the stopped one see their connections drop: clean errors). SIGCONT
        only if it was not replaced within `recover_s` (the round then fails on strength)."""
        f = self.rng.choice([f for f in st["frontends"] if f["state"] == "ready"])
        self.killed_frontends.add(f["index"])
        at = time.monotonic()
        _kill(f["pid"], signal.SIGSTOP)
        gone = lambda s: all(g["pid"] != f["pid"] for g in s["frontends"] if g["index"] == f["index"])  # noqa: E731
        replaced = await self.wait(gone, self.s.recover_s)
        if not replaced:
            _kill(f["pid"], signal.SIGCONT)
        return Injected(f"frontend-{f['index']} ({'replaced' if replaced else 'not replaced'})", gone, at=at)

    async def hang_controller(self, st: dict) -> Injected:
        """SIGSTOP the controller and leave it stopped: routing calls time out (503s), a frontend's watchdog
        kills it and Ray restarts it. SIGCONT only if it was not restarted within `recover_s`."""
        pid, at = st["controller"]["pid"], time.monotonic()
        _kill(pid, signal.SIGSTOP)
        gone = lambda s: s["controller"]["pid"] != pid  # noqa: E731
        restarted = await self.wait(gone, self.s.recover_s)
        if not restarted:
            _kill(pid, signal.SIGCONT)
        return Injected(f"controller ({'restarted' if restarted else 'not restarted'})", gone, at=at)

    async def fail_transfer(self, st: dict) -> Injected:
        """The next KV pull into a decode worker fails: a P->D handoff's (the frontend retries the request)
        or a migration's (the request stays where it was); fired once either is seen."""
        w = self.rng.choice(_ready(st, "decode"))
        handle = ray.get_actor(worker_actor_name(self.name, w["worker_id"]), namespace=NAMESPACE)
        before = (await retries(self.urls), await self._failed_migrations(w["worker_id"]))
        await asyncio.wait_for(asyncio.ensure_future(handle.inject_fault.remote("fail_transfer")), 30)
        deadline, how = time.monotonic() + FIRE_WAIT_S, ""
        while None not in before and not how and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            if (await retries(self.urls) or 0) > before[0]:
                how = "a handoff failed, retried"
            elif (await self._failed_migrations(w["worker_id"]) or 0) > before[1]:
                how = "a migration failed"
        return Injected(f"{w['worker_id']} ({how or 'never fired'})", fired=bool(how))

    async def _failed_migrations(self, target: str) -> int | None:
        """Migrations into `target` that the injected fault failed, in the controller's history."""
        try:
            history = await asyncio.wait_for(asyncio.ensure_future(self.controller.migrations.remote()), 10)
        except Exception:
            return None
        return sum(r.target == target and r.outcome == "failed" and "injected fault" in r.error for r in history)

    async def client_disconnect(self, st: dict) -> Injected:
        n = len(self.urls)
        async with httpx.AsyncClient(timeout=self.s.deadline_s) as client:
            left = await asyncio.gather(*(
                complete(client, self.urls[i % n], i % n, self.long_case, True, self.s.deadline_s, leave_after=3)
                for i in range(self.s.disconnects)
            ))  # fmt: skip
        self.extra += left
        return Injected(f"{len(left)} streams", fired=all(o.status == "left" for o in left))

    async def scale_in(self, st: dict) -> Injected:
        """One decode worker fewer while a random worker is SIGKILLed; once the drain is over (n - 1 decode
        workers live, none draining), back to n."""
        n, at = st["targets"]["decode"], time.monotonic()
        scale = asyncio.ensure_future(self.controller.scale.remote(decode=n - 1))
        killed, _ = await asyncio.gather(self.kill_worker(st), scale)

        def drained(s: dict) -> bool:
            live = [w for w in s["workers"] if w["role"] == "decode" and w["state"] in ("starting", "ready")]
            draining = [w for w in s["workers"] if w["state"] == "draining"]
            return killed.gone(s) and len(live) == n - 1 and not draining

        smaller = await self.wait(drained, self.s.recover_s)
        await self.controller.scale.remote(decode=n)
        return Injected(f"decode {n}->{n - 1}->{n}, {killed.victim}", killed.gone, fired=smaller, at=at)

    async def migrate(self, st: dict) -> Injected:
        """POST /admin/migrate on a running stream while a random decode worker is SIGKILLed."""
        fe = self.rng.randrange(len(self.urls))
        url, racing = self.urls[fe], []

        async def post(client, request_id: str) -> str:
            try:
                r = await client.post(f"{url}/admin/migrate", json={"request_id": request_id}, headers=self.headers)
            except CONNECTION_ERRORS as e:
                self.extra.append(Outcome("unclean", "migrate: connection error", fe, None, 0.0, repr(e)))
                return "connection error"
            body = _json(r)
            if r.status_code == 200 and isinstance(body, dict) and "data" in body:
                return ",".join(str(d.get("outcome")) for d in body["data"])
            if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
                self.extra.append(Outcome("unclean", f"migrate: {r.status_code} without an error object", fe, None,
                                          0.0, r.text[:300]))  # fmt: skip
            return f"HTTP {r.status_code}"

        async def kill() -> Injected:
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))
            return await self.kill_worker(st, "decode")

        async with httpx.AsyncClient(timeout=self.s.deadline_s + 10) as client:

            async def race(request_id: str) -> None:
                racing.append(asyncio.ensure_future(asyncio.gather(post(client, request_id), kill())))

            out = await complete(client, url, fe, self.long_case, True, self.s.deadline_s, on_id=race, id_after=4)
            self.extra.append(out)
            if not racing:
                return Injected(f"the stream ended first ({out.status})", fired=False)
            answer, killed = await asyncio.wait_for(racing[0], self.s.deadline_s)
        return Injected(f"migrate: {answer}; {killed.victim} killed", killed.gone, at=killed.at)

    # ---- a round ---------------------------------------------------------------------------------------------
    async def round(self, number: int, kind: str) -> dict:
        """Load, the fault `warm_s` in, back at full strength, load until `interval_s`, drain, check."""
        start = time.monotonic()
        self.killed_frontends, self.extra = set(), []
        retries0 = await retries(self.urls)
        self.load.start()
        await asyncio.sleep(self.s.warm_s)
        st, violations = await self.status(30), []
        if not at_target(st, len(self.urls)):
            violations.append(f"not at full strength before the fault: {_strength(st)}")
        fault = None
        try:
            fault = await getattr(self, kind)(st) if st is not None else None
        except Exception as e:  # e.g. no ready worker of the role to pick: the round fails, the run goes on
            violations.append(f"{kind} could not be injected: {e!r}")
        if fault is not None and not fault.fired:
            violations.append(f"{kind} did not take effect: {fault.victim}")
        seen_gone = fault is not None and (fault.gone is None or await self.wait(fault.gone, self.s.recover_s))
        full = seen_gone and await self.wait(lambda s: at_target(s, len(self.urls)), self.s.recover_s)
        recovered_s = time.monotonic() - fault.at if full else None
        if not full:
            now = _strength(await self.status())
            violations.append(f"not back at full strength within {self.s.recover_s:.0f} s: {now}")
        await asyncio.sleep(max(0.0, self.s.interval_s - (time.monotonic() - start)))
        outcomes = await self.load.pause() + self.extra
        leaks = await self.leaks()
        retries1 = await retries(self.urls)
        record = {
            "round": number, "fault": kind, "victim": fault.victim if fault else "(no status: not injected)",
            "fired": bool(fault and fault.fired), "recovered_s": recovered_s, "round_s": time.monotonic() - start,
            "retries": None if None in (retries0, retries1) else max(0, int(retries1 - retries0)),
        }  # fmt: skip
        return self._check(record, outcomes, leaks, violations)

    def _check(self, record: dict, outcomes: list[Outcome], leaks: list[str], violations: list[str]) -> dict:
        for o in outcomes:  # a connection error is clean only from a frontend this round killed
            if o.detail == "connection" and o.frontend not in self.killed_frontends:
                o.status, o.detail = "unclean", "connection error on a live frontend"
        done = [o for o in outcomes if o.stream is not None]  # completions (the rest: admin calls)
        count = Counter(o.status for o in done)
        lost = [o for o in outcomes if o.status in ("wrong", "hung")]
        unclean = [o for o in outcomes if o.status == "unclean"]
        leaked = sum(_held_blocks(r) for r in leaks)
        if lost:
            violations.append(f"{len(lost)} lost: {[f'{o.status} {o.detail} {o.note}' for o in lost[:3]]}")
        if unclean:
            violations.append(f"{len(unclean)} unclean endings: {[f'{o.detail} {o.note}' for o in unclean[:3]]}")
        if leaks:
            violations.append(f"held after the drain ({leaked} KV blocks): {leaks[:3]}")
        return {
            **record, "requests": len(done), "served": count["ok"], "errors": count["error"], "lost": len(lost),
            "unclean": len(unclean), "left": count["left"], "leaked_blocks": leaked, "leaks": leaks,
            "slowest_s": max((o.latency_s for o in done), default=None),
            "error_kinds": dict(Counter(o.detail for o in done if o.status == "error")), "violations": violations,
        }  # fmt: skip

    async def leaks(self) -> list[str]:
        """What the ready workers still hold, and requests the frontends still count as running (admission
        slots), polled until nothing (or `leak_s`)."""
        deadline = time.monotonic() + self.s.leak_s
        while True:
            st, reports = await self.status(), []
            running = await frontend_metric(self.urls, "pdserve_num_requests_running ")
            reports += [f"frontend-{i}: {n:.0f} requests running" for i, n in enumerate(running) if n]
            for w in _ready(st) if st else []:
                try:
                    handle = ray.get_actor(worker_actor_name(self.name, w["worker_id"]), namespace=NAMESPACE)
                    report = await asyncio.wait_for(asyncio.ensure_future(handle.leak_report.remote()), 10)
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


def _held_blocks(report: str) -> int:
    m = re.search(r"\((\d+) in all\)", report)
    return int(m.group(1)) if m else 0


def _json(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return None
