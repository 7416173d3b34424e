"""The controller's registry: pool targets follow the config tree's rules, and a refused change leaves them
as they were; states move one way, to dead, by the transition table; every write bumps the counters; records
are read-only outside it; the router's views follow it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pdserve.controller.registry import STATES, FrontendRecord, InvalidTransition, Registry, WorkerRecord
from pdserve.protocol import WorkerStats
from pdserve.router.router import Router, RouterConfig


def test_targets_are_checked_by_the_config_rules_and_a_refusal_changes_nothing():
    reg = Registry({"prefill": 1, "decode": 1})
    reg.set_targets(prefill=2, decode=3)
    assert reg.targets == {"prefill": 2, "decode": 3, "colocated": 0}
    for bad, key in (({"decode": 0}, "pools"), ({"prefill": -1}, "prefill"), ({"colocated": "x"}, "colocated")):
        version = reg.version
        with pytest.raises(ValueError, match=key):
            reg.set_targets(**bad)
        assert reg.targets == {"prefill": 2, "decode": 3, "colocated": 0} and reg.version == version
    reg.set_targets(prefill=0, decode=0, colocated=2)
    assert reg.missing() == {"prefill": 0, "decode": 0, "colocated": 2}


def test_states_and_membership():
    reg = Registry({"decode": 1})
    reg.add(WorkerRecord("decode-1", "decode"))
    assert reg.missing()["decode"] == 0 and reg.membership()[0][:3] == ("decode-1", "decode", "starting")
    assert reg.set_state("decode-1", "ready") and reg.ready_roles() == {"decode"}
    assert reg.set_state("decode-1", "dead") and reg.set_state("decode-1", "ready") is None  # dead is final
    assert reg.membership() == [] and reg.missing()["decode"] == 1
    with pytest.raises(ValueError, match="state"):
        reg.set_state("decode-1", "zombie")


ALLOWED = {("starting", "ready"), ("starting", "dead"), ("ready", "draining"), ("ready", "dead"), ("draining", "dead")}


def registry_with(state: str) -> Registry:
    reg = Registry({"decode": 1})
    reg.add(WorkerRecord("decode-1", "decode", state=state))
    return reg


@pytest.mark.parametrize("old", STATES)
@pytest.mark.parametrize("new", STATES)
def test_the_transition_table(old, new):
    reg = registry_with(old)
    version, writes = reg.version, reg.writes
    if (old, new) in ALLOWED:
        assert reg.set_state("decode-1", new).state == new
        assert (reg.version, reg.writes) == (version + 1, writes + 1)
        return
    if old == new or old == "dead":  # no change, or a late event about a dead worker: ignored
        assert reg.set_state("decode-1", new) is None
    else:
        with pytest.raises(InvalidTransition, match=f"decode-1.*{old} -> {new}"):
            reg.set_state("decode-1", new)
    assert reg.workers["decode-1"].state == old and (reg.version, reg.writes) == (version, writes)


def stats(worker_id: str, running: int = 0, alive: bool = True) -> WorkerStats:
    return WorkerStats(
        worker_id=worker_id, role="decode", num_running=running, num_waiting=0, num_held=0, num_free_blocks=8,
        num_blocks=8, kv_usage=0.0, num_prefill_tokens_queued=0, time=0.0, alive=alive,
    )  # fmt: skip


def test_every_write_bumps_the_counters_in_one_place():
    reg = Registry({"decode": 1})
    woken = []
    reg.on_version(lambda: woken.append(reg.version))
    writes = [
        (lambda: reg.add(WorkerRecord("decode-1", "decode")), True),
        (lambda: reg.set_info("decode-1", node_id="n", pid=7), False),
        (lambda: reg.set_info("decode-1", peer="peer-info"), True),
        (lambda: reg.set_state("decode-1", "ready"), True),
        (lambda: reg.report(stats("decode-1", 3)), False),  # a heartbeat wakes no membership long-poll
        (lambda: reg.ask_to_leave("decode-1"), False),
        (lambda: reg.set_targets(decode=2), True),
        (lambda: reg.shrink_target("decode"), True),
        (lambda: reg.add_frontend(FrontendRecord(0, "h")), True),
        (lambda: reg.frontend_ready(0, "h", "http://x", 9), True),
        (lambda: reg.forget_frontend(0, "h"), True),
        (lambda: reg.set_state("decode-1", "dead"), True),
        (lambda: reg.forget("decode-1"), True),
    ]
    for write, membership in writes:
        version, count = reg.version, reg.writes
        write()
        assert reg.writes == count + 1 and reg.version == version + membership
    assert woken == list(range(1, reg.version + 1))
    version, count = reg.version, reg.writes  # writes about a worker that is gone change nothing
    assert reg.report(stats("decode-1")) is None and reg.set_info("decode-1", pid=1) is None
    assert reg.set_state("decode-1", "ready") is None and (reg.version, reg.writes) == (version, count)


def test_records_are_read_only_outside_the_registry():
    reg = Registry({"decode": 1})
    rec = reg.add(WorkerRecord("decode-1", "decode"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.state = "ready"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.stats = stats("decode-1")
    with pytest.raises(TypeError):
        reg.workers["decode-2"] = WorkerRecord("decode-2", "decode")
    with pytest.raises(TypeError):
        reg.frontends[0] = FrontendRecord(0, "h")
    reg.targets["decode"] = 5
    assert reg.targets["decode"] == 1
    with pytest.raises(AttributeError):
        reg.version = 0
    with pytest.raises(ValueError, match="set_info"):
        reg.set_info("decode-1", state="ready")
    with pytest.raises(ValueError, match="already"):
        reg.add(WorkerRecord("decode-1", "decode"))


def test_a_dead_worker_leaves_the_mesh_and_a_stale_frontend_is_not_forgotten():
    reg = Registry({"decode": 2})
    for wid in ("decode-1", "decode-2"):
        reg.add(WorkerRecord(wid, "decode", peer=f"peer-{wid}"))
    reg.set_state("decode-1", "dead")
    assert reg.peers() == [("decode-2", "peer-decode-2")]
    reg.add_frontend(FrontendRecord(0, "old"))
    assert reg.forget_frontend(0, "new") is None and reg.frontend_ready(0, "new", "u", 1) is None
    assert reg.frontend_rows() == [{"index": 0, "url": None, "state": "starting", "pid": 0}]
    assert not reg.frontends_ready(1) and reg.frontend_ready(0, "old", "u", 1) and reg.frontends_ready(1)


def test_the_router_views_are_a_projection_of_the_registry():
    reg, router = Registry({"decode": 2}), Router(RouterConfig())
    reg.listen(router.project)
    reg.add(WorkerRecord("decode-1", "decode"))
    reg.add(WorkerRecord("decode-2", "decode"))
    assert router.views == {}  # starting: not routable
    reg.set_state("decode-1", "ready")
    reg.set_state("decode-2", "ready")
    assert set(router.views) == {"decode-1", "decode-2"} and router.views["decode-1"].num_blocks == 0
    reg.report(stats("decode-1", running=3))
    assert router.views["decode-1"].num_running == 3 and router.views["decode-1"].num_blocks == 8
    reg.report(stats("decode-2", alive=False))  # its last report: closing
    assert set(router.views) == {"decode-1"}
    reg.set_state("decode-1", "draining")
    assert router.views == {} and set(router.pools["decode"].views) == set()


def test_nothing_outside_the_registry_reaches_into_its_private_state():
    root = Path(__file__).resolve().parents[2] / "pdserve"
    private = re.compile(r"registry\._\w+|\.(_workers|_frontends|_targets|_version|_writes)\b")
    found = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in root.rglob("*.py")
        if path.name != "registry.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, found
