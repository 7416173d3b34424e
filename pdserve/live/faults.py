"""Faults injected into a live deployment, one call each, on the processes its controller's status lists:
SIGKILL a worker, a frontend or the controller; SIGSTOP one (a worker resumed after `hang_s`, a frontend or the
controller left stopped until replaced); fail a worker's next KV pull; streams left by their clients; a
scale-in and an operator migration, each racing a SIGKILL. Each returns an `Injected` saying what it hit."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from pdserve.config import NAMESPACE, ROLES, worker_actor_name
from pdserve.load.client import Client, completion_body
from pdserve.load.metrics import scrape_all, total
from pdserve.load.oracle import Case
from pdserve.load.outcome import Outcome

FAULTS = (
    "kill_worker", "kill_frontend", "kill_controller", "hang_worker", "hang_frontend", "hang_controller",
    "fail_transfer", "client_disconnect", "scale_in", "migrate",
)  # fmt: skip
POLL_S = 0.2
FIRE_WAIT_S = 20.0  # fail_transfer: a handoff or a migration into the worker comes within this
MODEL = "pdserve-demo"
ADMIN = "admin"  # the tag of an admin call's outcome in `Faults.extra` (the others are completions)


def ready(st: dict, role: str | None = None) -> list[dict]:
    return [w for w in st["workers"] if w["state"] == "ready" and role in (None, w["role"])]


def at_target(st: dict | None, frontends: int) -> bool:
    """Ready workers per role == the targets, none draining or starting, every frontend ready."""
    if st is None:
        return False
    count = Counter(w["role"] for w in ready(st))
    busy = [w for w in st["workers"] if w["state"] in ("starting", "draining")]
    fronts = [f for f in st["frontends"] if f["state"] == "ready"]
    return all(count[r] == st["targets"].get(r, 0) for r in ROLES) and not busy and len(fronts) == frontends


def worker_gone(worker_id: str) -> Callable[[dict], bool]:
    return lambda st: all(w["state"] == "dead" for w in st["workers"] if w["worker_id"] == worker_id)


def signal_pid(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # gone already
        pass


async def retries(urls: list[str]) -> float | None:
    """The frontends' request retries so far (pdserve_request_retries_total), None if one does not answer."""
    samples = await scrape_all(urls)
    return None if None in samples else sum(total(s, "pdserve_request_retries_total") for s in samples)


@dataclass
class Injected:
    victim: str
    gone: Callable[[dict], bool] | None = None  # true once the status shows the victim gone
    fired: bool = True  # the fault took effect (a KV transfer failed, the smaller size was reached...)
    at: float = field(default_factory=time.monotonic)  # when it hit: the recovery time runs from here


class Faults:
    """The faults of FAULTS as methods `fault(status) -> Injected` on the deployment `dep` behind `urls`.
    Requests the faults make themselves land in `extra` (tagged by their `Case`, or ADMIN); `killed_frontends`
    holds the frontends they killed or stopped. `reset()` clears both (a chaos round's start)."""

    def __init__(self, dep, urls: list[str], long_case: Case, *, seed: int = 0, hang_s: float = 5.0,
                 recover_s: float = 120.0, deadline_s: float = 60.0, disconnects: int = 4) -> None:  # fmt: skip
        self.controller, self.name, self.urls, self.long_case = dep.controller, dep.config.name, urls, long_case
        self.hang_s, self.recover_s, self.deadline_s, self.disconnects = hang_s, recover_s, deadline_s, disconnects
        self.rng = random.Random(seed)
        admin = dep.config.frontend.admin_keys
        self.headers = {"Authorization": f"Bearer {admin[0]}"} if admin else {}
        self.extra: list[Outcome] = []
        self.killed_frontends: set[int] = set()

    def reset(self) -> None:
        self.extra, self.killed_frontends = [], set()

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

    def worker(self, worker_id: str):
        return ray.get_actor(worker_actor_name(self.name, worker_id), namespace=NAMESPACE)

    def _long(self) -> tuple[dict, Case]:
        c = self.long_case
        return completion_body(MODEL, c.prompt, c.max_tokens, stream=True), c

    def _admin(self, error: str, status: int = 0) -> Outcome:
        """An admin call that went wrong: `unreadable`, tagged ADMIN (not a completion)."""
        return Outcome(kind="unreadable", status=status, error=error[:300], tag=ADMIN)

    # ---- faults
    async def kill_worker(self, st: dict, role: str | None = None) -> Injected:
        w = self.rng.choice(ready(st, role))
        signal_pid(w["pid"])
        return Injected(w["worker_id"], worker_gone(w["worker_id"]))

    def _frontend_gone(self, f: dict) -> Callable[[dict], bool]:
        return lambda s: all(g["pid"] != f["pid"] for g in s["frontends"] if g["index"] == f["index"])

    async def kill_frontend(self, st: dict) -> Injected:
        f = self.rng.choice([f for f in st["frontends"] if f["state"] == "ready"])
        self.killed_frontends.add(f["index"])
        signal_pid(f["pid"])
        return Injected(f"frontend-{f['index']}", self._frontend_gone(f))

    async def kill_controller(self, st: dict) -> Injected:
        pid = st["controller"]["pid"]
        signal_pid(pid)
        return Injected("controller", lambda s: s["controller"]["pid"] != pid)

    async def hang_worker(self, st: dict) -> Injected:
        """SIGSTOP for `hang_s` (past the heartbeat timeout), then SIGCONT: declared dead and replaced, or
        serving again; requests are never left waiting on it (the load's deadline)."""
        w = self.rng.choice(ready(st))
        at = time.monotonic()
        signal_pid(w["pid"], signal.SIGSTOP)
        try:
            await asyncio.sleep(self.hang_s)
        finally:
            signal_pid(w["pid"], signal.SIGCONT)
        after = await self.status()
        dead = after is not None and worker_gone(w["worker_id"])(after)
        return Injected(f"{w['worker_id']} ({'declared dead' if dead else 'recovered'})", at=at)

    async def hang_frontend(self, st: dict) -> Injected:
        """SIGSTOP a frontend and leave it stopped: the controller's pings go unanswered, it kills it and
        starts a replacement (clients of the stopped one see their connections drop: clean errors). SIGCONT
        only if it was not replaced within `recover_s` (the round then fails on strength)."""
        f = self.rng.choice([f for f in st["frontends"] if f["state"] == "ready"])
        self.killed_frontends.add(f["index"])
        at = time.monotonic()
        signal_pid(f["pid"], signal.SIGSTOP)
        gone = self._frontend_gone(f)
        replaced = await self.wait(gone, self.recover_s)
        if not replaced:
            signal_pid(f["pid"], signal.SIGCONT)
        return Injected(f"frontend-{f['index']} ({'replaced' if replaced else 'not replaced'})", gone, at=at)

    async def hang_controller(self, st: dict) -> Injected:
        """SIGSTOP the controller and leave it stopped: routing calls time out (503s), a frontend's watchdog
        kills it and Ray restarts it. SIGCONT only if it was not restarted within `recover_s`."""
        pid, at = st["controller"]["pid"], time.monotonic()
        signal_pid(pid, signal.SIGSTOP)
        gone = lambda s: s["controller"]["pid"] != pid  # noqa: E731
        restarted = await self.wait(gone, self.recover_s)
        if not restarted:
            signal_pid(pid, signal.SIGCONT)
        return Injected(f"controller ({'restarted' if restarted else 'not restarted'})", gone, at=at)

    async def fail_transfer(self, st: dict) -> Injected:
        """The next KV pull into a decode worker fails: a P->D handoff's (the frontend retries the request)
        or a migration's (the request stays where it was); fired once either is seen."""
        w = self.rng.choice(ready(st, "decode"))
        before = (await retries(self.urls), await self._failed_migrations(w["worker_id"]))
        await asyncio.wait_for(asyncio.ensure_future(self.worker(w["worker_id"]).inject_fault.remote("fail_transfer")),
                               30)  # fmt: skip
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
        """`disconnects` streams of the long case, spread over the frontends, each left after 3 chunks."""
        n = len(self.urls)

        async def leave(i: int) -> Outcome:
            async with Client(self.urls[i % n], timeout_s=self.deadline_s) as c:
                body, tag = self._long()
                return await c.send(body, deadline_s=self.deadline_s, leave_after=3, tag=tag)

        left = await asyncio.gather(*(leave(i) for i in range(self.disconnects)))
        self.extra += left
        return Injected(f"{len(left)} streams", fired=all(o.kind == "left" for o in left))

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

        smaller = await self.wait(drained, self.recover_s)
        await self.controller.scale.remote(decode=n)
        return Injected(f"decode {n}->{n - 1}->{n}, {killed.victim}", killed.gone, fired=smaller, at=at)

    async def migrate(self, st: dict) -> Injected:
        """POST /admin/migrate on a running stream while a random decode worker is SIGKILLed. An answer to the
        POST that is not JSON with `data` or an OpenAI error object lands in `extra` (see `_admin`)."""
        fe = self.rng.randrange(len(self.urls))
        racing: list[asyncio.Future] = []
        async with Client(self.urls[fe], timeout_s=self.deadline_s + 10) as client:

            async def post(request_id: str) -> str:
                try:
                    code, body = await client.post("/admin/migrate", {"request_id": request_id}, self.headers)
                except Exception as e:
                    self.extra.append(self._admin(f"migrate: connection error {e!r}"))
                    return "connection error"
                if code == 200 and isinstance(body, dict) and "data" in body:
                    return ",".join(str(d.get("outcome")) for d in body["data"])
                if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
                    self.extra.append(self._admin(f"migrate: {code} without an error object {body}", code))
                return f"HTTP {code}"

            async def kill() -> Injected:
                await asyncio.sleep(self.rng.uniform(0.0, 0.5))
                return await self.kill_worker(st, "decode")

            async def on_chunk(n: int, chunk: dict) -> None:
                if n == 4:  # a few tokens in: the request runs on a decode worker
                    racing.append(asyncio.ensure_future(asyncio.gather(post(chunk["id"]), kill())))

            body, tag = self._long()
            out = await client.send(body, deadline_s=self.deadline_s, on_chunk=on_chunk, tag=tag)
            self.extra.append(out)
            if not racing:
                return Injected(f"the stream ended first ({out.kind})", fired=False)
            answer, killed = await asyncio.wait_for(racing[0], self.deadline_s)
        return Injected(f"migrate: {answer}; {killed.victim} killed", killed.gone, at=killed.at)
