"""The collective transport's NCCL-shaped path on CPU (a Gloo watch group beside the data group, as NCCL needs):
exact bytes, a peer that dies failing the waiting transfer fast, and every posted send or recv bounded."""

import asyncio
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch

from pdserve.kv import KVTransferError, TransferState, make_transport
from pdserve.kv.transports import collective
from pdserve.protocol import PeerInfo
from tests.unit.test_kv_transport import assert_moved, cache, collective_pair, layout, pull_and_serve, transport

ROOT = Path(__file__).resolve().parents[2]
PEER = "zz-peer"  # sorts after "nccl-<n>": the test's transport is rank 0 and hosts the pair's store


def wait_for(t, handle: int, limit_s: float) -> TransferState:
    deadline = time.monotonic() + limit_s
    while (state := t.poll(handle)) is TransferState.PENDING:
        assert time.monotonic() < deadline, f"still pending after {limit_s} s"
        time.sleep(0.005)
    return state


@pytest.mark.parametrize("serialize", [False, True])
def test_separate_watch_group_moves_exact_bytes(serialize):
    threads = threading.active_count()
    sender, receiver = collective_pair(serialize=serialize, _separate_watch_group=True)
    try:
        before = receiver.kv_cache.clone()
        asyncio.run(pull_and_serve(sender, receiver, [3, 9, 10], [0, 7, 1], key=1))
        asyncio.run(pull_and_serve(sender, receiver, [15], [15], key=2))  # the same group again
        group = receiver._peers[sender.name].group
        assert group.watch is not group.pg and group.dead is None
        assert_moved(sender, receiver, before, [3, 9, 10, 15], [0, 7, 1, 15])
    finally:
        receiver.close()
        sender.close()
    assert threading.active_count() == threads  # both groups closed, the watchers joined


def test_op_timeout_is_the_slack_plus_the_bytes_at_the_floor_bandwidth():
    assert collective.op_timeout_s(0, 10.0, 100e6) == 10.0
    assert collective.op_timeout_s(500_000_000, 10.0, 100e6) == pytest.approx(15.0)
    assert collective.op_timeout_s(64 << 30, 2.0, 1e9) == pytest.approx(2.0 + 68.719, abs=1e-3)
    for bad in ({"min_bandwidth_bps": 0}, {"timeout_s": -1.0}):
        with pytest.raises(ValueError, match="must be > 0"):
            transport("nccl", 2, seed=0, **bad)


class _Work:
    """An NCCL op as the host sees it: `is_completed` reads a CUDA event; `wait` orders the current stream."""

    def __init__(self, completes_after: int | None):
        self.polls, self.waited, self.completes_after = 0, False, completes_after

    def is_completed(self) -> bool:
        self.polls += 1
        return self.completes_after is not None and self.polls > self.completes_after

    def wait(self, timeout):
        self.waited = True


def _group():
    return collective._Group(pg=None, watch=None, peer="p", store=None, peer_rank=1, address=("", 0, ""))


def test_polled_op_completes_times_out_or_sees_the_group_die():
    work = _Work(completes_after=3)
    collective._wait_op(_group(), work, 5.0, "recv from peer 'p'", poll=True)
    assert work.waited and work.polls == 4

    start, work = time.monotonic(), _Work(completes_after=None)
    with pytest.raises(KVTransferError, match=r"recv from peer 'p' timed out after 0.2 s"):
        collective._wait_op(_group(), work, 0.2, "recv from peer 'p'", poll=True)
    assert 0.2 <= time.monotonic() - start < 5.0 and not work.waited

    group, work = _group(), _Work(completes_after=None)
    threading.Timer(0.1, group.kill, ["connection to peer 'p' lost"]).start()
    with pytest.raises(KVTransferError, match="connection to peer 'p' lost"):
        collective._wait_op(group, work, 30.0, "send to peer 'p'", poll=True)
    assert not work.waited

    group, work = _group(), _Work(completes_after=0)  # an abort ends a posted op as if it had completed
    group.kill("the group was closed")
    with pytest.raises(KVTransferError, match="the group was closed"):
        collective._wait_op(group, work, 30.0, "recv from peer 'p'", poll=True)
    assert not work.waited


@pytest.mark.parametrize("separate", [False, True])
def test_a_recv_whose_sender_never_sends_fails_after_the_bound_and_the_pair_is_not_reused(separate):
    sender, receiver = collective_pair(timeout_s=1.5, min_bandwidth_bps=1e12, _separate_watch_group=separate)
    go, turn = threading.Event(), sender._turn

    def stalled(group, seq):  # the serve is committed (past the handshake) but does not post its send yet
        go.wait(20)
        return turn(group, seq)

    sender._turn = stalled
    try:
        before = receiver.kv_cache.clone()
        served = sender.start_serve(receiver.name, [2], 4)
        start = time.monotonic()
        pulled = receiver.start_pull(sender.name, [2], [5], 4)
        assert wait_for(receiver, pulled, 15) is TransferState.FAILED
        assert 1.5 <= time.monotonic() - start < 12
        error = receiver.error(pulled)
        assert re.fullmatch(rf"recv of \d+ bytes from peer '{sender.name}' timed out after 1.5 s", error), error
        assert receiver._peers[sender.name].group.dead
        go.set()
        assert wait_for(sender, served, 10) is TransferState.FAILED  # its end of the pair was closed too
        receiver.release(pulled)
        sender.release(served)
        del sender._turn
        asyncio.run(pull_and_serve(sender, receiver, [6], [6], key=5))  # a fresh group
        assert torch.equal(receiver.kv_cache[5], before[5])
        assert torch.equal(receiver.kv_cache[6], sender.kv_cache[6])
    finally:
        go.set()
        receiver.close()
        sender.close()


def serve_then_stall(phase: str) -> None:
    """The peer process: serve one transfer, then stall the next one in `phase` until it is killed."""
    sender = make_transport("nccl", PEER, cache(16, seed=11), layout(16), timeout_s=60.0, _separate_watch_group=True)
    print(msgspec.json.encode(sender.peer_info()).decode(), flush=True)
    receiver = msgspec.json.decode(sys.stdin.readline(), type=PeerInfo)
    sender.add_peer(receiver)
    asyncio.run(sender.serve(receiver.name, [1, 2], 1, timeout_s=30.0))

    def stall(*_):
        print("stalled", flush=True)
        time.sleep(3600)

    if phase == "handshake":  # a serve syncs after copying its blocks out, before the handshake
        sender._sync = stall
    else:  # past the handshake: the pull is committed and waits in its recv
        sender._turn = stall
    sender.start_serve(receiver.name, [3], 2)
    time.sleep(3600)


@pytest.mark.parametrize("phase", ["handshake", "data"])
def test_a_peer_that_dies_fails_the_waiting_transfer_fast(phase):
    """timeout_s is 60 s: only the watcher can end either wait within the test's bound."""
    code = f"import sys; from tests.unit.test_collective_watch import serve_then_stall; serve_then_stall({phase!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.decode().strip()) for line in child.stdout], daemon=True).start()
    receiver = transport("nccl", 16, seed=12, timeout_s=60.0, _separate_watch_group=True)
    try:
        info = msgspec.json.decode(lines.get(timeout=60), type=PeerInfo)
        receiver.add_peer(info)
        child.stdin.write(msgspec.json.encode(receiver.peer_info()) + b"\n")
        child.stdin.flush()
        asyncio.run(receiver.pull(PEER, [1, 2], [4, 5], timeout_s=30.0, key=1))
        assert torch.equal(receiver.kv_cache[4:6], cache(16, seed=11)[1:3])
        handle = receiver.start_pull(PEER, [3], [6], key=2)
        assert lines.get(timeout=30) == "stalled"
        time.sleep(0.3)  # let the pull reach its wait
        assert receiver.poll(handle) is TransferState.PENDING
        child.kill()
        start = time.monotonic()
        assert wait_for(receiver, handle, 15) is TransferState.FAILED
        assert time.monotonic() - start < 15
        error = receiver.error(handle)
        if phase == "handshake":  # nothing else notices: the store is ours and the data pair is idle
            assert error.startswith(f"connection to peer {PEER!r} lost"), error
        else:  # the data pair may see the closed socket before the watcher does
            assert PEER in error and re.search("lost|closed|reset", error, re.IGNORECASE), error
        group = receiver._peers[PEER].group
        group.watcher.join(10)
        assert group.dead and not group.watcher.is_alive()
    finally:
        child.kill()
        child.wait(10)
        receiver.close()
