"""The autoscaler's actuation loop against a fake controller: an action that fails (raises, or does not settle
within action_timeout_s) is reported, exported and retried after a growing backoff; no pass acts while the
last action is still taking effect; Prometheus without data never shrinks a pool."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from pdserve.autoscale.actuate import BACKOFF_S, Autoscaler
from pdserve.autoscale.policy import Signals
from tests.conftest import serve_config


class Labelled:
    def __init__(self) -> None:
        self.values = Counter()

    def labels(self, *key):
        return SimpleNamespace(inc=lambda: self.values.update([key]), set=lambda v: self.values.update({key: 0}))


class Fake:
    """Registry, lifecycle, router and observer in one: workers ready at once unless `start_fails`."""

    def __init__(self, decode: int, tokens_per_s: float | None) -> None:
        self.workers = {f"decode-{i}": self._rec(f"decode-{i}", "ready") for i in range(decode)}
        self.targets = {"prefill": 0, "decode": decode, "colocated": 0}
        self.tokens_per_s, self.start_fails, self.starts, self.removed = tokens_per_s, 0, 0, []
        self.index = SimpleNamespace(unique_blocks=lambda wid: 0)
        self.last_error = None

    @staticmethod
    def _rec(wid, state):
        return SimpleNamespace(worker_id=wid, role="decode", state=state, stats=SimpleNamespace(num_running=0))

    def set_targets(self, **sizes):
        self.targets.update(sizes)

    def publish_targets(self):
        pass

    def reconcile(self):
        while sum(r.state != "dead" for r in self.workers.values()) < self.targets["decode"]:
            self.starts += 1
            if self.start_fails < 0:  # never starts: stays "starting"
                self.workers[f"decode-s{self.starts}"] = self._rec(f"decode-s{self.starts}", "starting")
                return
            if self.start_fails:
                self.start_fails -= 1
                raise RuntimeError("no resources")
            wid = f"decode-n{self.starts}"
            self.workers[wid] = self._rec(wid, "ready")

    async def remove(self, worker_id):
        self.removed.append(worker_id)
        del self.workers[worker_id]
        self.targets["decode"] -= 1

    async def observe(self, sizes, starting=None):
        return Signals(sizes["prefill"], sizes["decode"], sizes["colocated"], decode_tokens_per_s=self.tokens_per_s)


def autoscaler(fake: Fake, **auto) -> tuple[Autoscaler, SimpleNamespace]:
    cfg = {"enabled": True, "prometheus_url": "http://x", "decode_tokens_per_worker": 100, "min_decode": 1,
           "max_decode": 4, "min_prefill": 0, "cooldown_s": 0, "scale_in_window_s": 0, **auto}  # fmt: skip
    config = serve_config(pools={"prefill": 0, "decode": fake.targets["decode"]}, autoscaling=cfg)
    metrics = SimpleNamespace(autoscaler_desired=Labelled(), autoscaler_decisions=Labelled())
    return Autoscaler(config, fake, fake, fake, metrics, fake), metrics


def test_a_failing_scale_out_is_reported_and_retried_with_growing_backoff():
    fake = Fake(decode=1, tokens_per_s=250)  # 3 workers' worth
    fake.start_fails = 2
    auto, metrics = autoscaler(fake)
    steps = [0.0, 1.0, BACKOFF_S[0] + 0.1, BACKOFF_S[0] + 1.0, BACKOFF_S[0] + BACKOFF_S[1] + 0.2]
    results = [asyncio.run(auto.step(t)) for t in steps]
    assert [r and r.action for r in results] == ["scale_out", None, "scale_out", None, "scale_out"]
    failed = [d for d in auto.decisions if d["action"] == "failed"]
    assert [d["retry_in_s"] for d in failed] == [BACKOFF_S[0], BACKOFF_S[1]]
    assert all("no resources" in d["error"] for d in failed)
    assert metrics.autoscaler_decisions.values[("failed", "scale_out")] == 2
    assert auto.sizes()["decode"] == 3 and auto._failures == 0  # the third try got its workers


def test_a_worker_that_never_starts_times_out_and_is_reported_once():
    fake = Fake(decode=1, tokens_per_s=250)
    fake.start_fails = -1
    auto, metrics = autoscaler(fake, action_timeout_s=30)
    assert asyncio.run(auto.step(0.0)).action == "scale_out"
    assert [asyncio.run(auto.step(t)) for t in (5.0, 29.0)] == [None, None]  # waits: the start is in progress
    assert metrics.autoscaler_decisions.values[("failed", "action_timeout")] == 0
    assert asyncio.run(auto.step(31.0)) is None
    assert metrics.autoscaler_decisions.values[("failed", "action_timeout")] == 1
    assert auto.decisions[-1]["action"] == "failed" and auto.decisions[-1]["retry_in_s"] == BACKOFF_S[0]
    assert asyncio.run(auto.step(40.0)) is None  # still unsettled: no second report, no new action
    assert metrics.autoscaler_decisions.values[("failed", "action_timeout")] == 1 and fake.starts == 1


def test_no_data_holds_and_a_failing_scale_in_never_goes_below_min():
    fake = Fake(decode=2, tokens_per_s=None)
    auto, _ = autoscaler(fake)
    assert asyncio.run(auto.step(0.0)).reason == "no_data" and fake.removed == []
    fake.tokens_per_s = 0.0  # idle: scale in, one worker at a time, never under min_decode (1)
    for t in range(1, 10):
        asyncio.run(auto.step(float(t)))
    assert len(fake.removed) == 1 and auto.sizes()["decode"] == 1


def test_scale_in_removes_up_to_scale_in_max_workers():
    fake = Fake(decode=4, tokens_per_s=0.0)
    auto, _ = autoscaler(fake, scale_in_max_workers=2)
    assert asyncio.run(auto.step(0.0)).targets["decode"] == 2
    assert len(fake.removed) == 2 and auto.sizes()["decode"] == 2 and auto.settled()
