"""KV transports without Ray: the local oracle, NIXL and the collective (Gloo here) between two endpoints in one
process move the right blocks."""

import asyncio
import itertools
import resource
import sys
import threading
import time

import pytest
import torch

from pdserve.config import load_config
from pdserve.kv import KVTransferError, KVTransport, TransferState, make_transport
from pdserve.kv.transport import transport_options
from pdserve.kv.transports import collective
from pdserve.protocol import KVLayout, PeerInfo

SHAPE = (4, 2, 16, 2, 32)  # num_layers, K/V, block_size, num_kv_heads, head_dim
_names = itertools.count()


def layout(num_blocks: int, **changes) -> KVLayout:
    fields = dict(model_id="tiny", dtype="float32", block_size=16, num_layers=4, num_kv_heads=2, head_dim=32)
    fields.update(changes)
    block_bytes = fields["num_layers"] * 2 * fields["block_size"] * fields["num_kv_heads"] * fields["head_dim"] * 4
    return KVLayout(num_blocks=num_blocks, block_bytes=block_bytes, **fields)


def cache(num_blocks: int, seed: int) -> torch.Tensor:
    return torch.randn((num_blocks, *SHAPE), generator=torch.Generator().manual_seed(seed))


def transport(kind: str, num_blocks: int, seed: int, **options) -> KVTransport:
    return make_transport(kind, f"{kind}-{next(_names)}", cache(num_blocks, seed), layout(num_blocks), **options)


@pytest.fixture(params=["local", "nixl", "nccl"])
def kind(request):
    if request.param == "nixl":
        pytest.importorskip("nixl")
    return request.param


@pytest.fixture
def pair(kind):
    """(sender, receiver) of one kind, receiver connected to sender; closed afterwards."""
    sender, receiver = transport(kind, 40, seed=1), transport(kind, 24, seed=2)
    receiver.add_peer(sender.peer_info())
    if sender.two_sided:
        sender.add_peer(receiver.peer_info())
    yield sender, receiver
    receiver.close()
    sender.close()


def wait(t: KVTransport, handle: int) -> TransferState:
    while (state := t.poll(handle)) is TransferState.PENDING:
        pass
    return state


def transfer(sender, receiver, src, dst, key: int = 0) -> TransferState:
    """Start the sender's step (None for a one-sided kind) and the receiver's pull; poll both to the end."""
    served = sender.start_serve(receiver.name, src, key)
    handle = receiver.start_pull(sender.name, src, dst, key)
    state = wait(receiver, handle)
    if served is not None:
        assert wait(sender, served) is TransferState.DONE, sender.error(served)
        sender.release(served)
    assert receiver.poll(handle) is state  # stays put until released
    receiver.release(handle)
    receiver.release(handle)
    with pytest.raises(KeyError):
        receiver.poll(handle)
    return state


async def pull_and_serve(sender, receiver, src, dst, key: int = 0, timeout_s: float = 5.0) -> None:
    await asyncio.gather(
        receiver.pull(sender.name, src, dst, timeout_s=timeout_s, key=key),
        sender.serve(receiver.name, src, key, timeout_s=timeout_s),
    )


def assert_moved(sender, receiver, before, src, dst):
    for s, d in zip(src, dst):
        assert torch.equal(receiver.kv_cache[d], sender.kv_cache[s]), (s, d)
    untouched = [i for i in range(receiver.layout.num_blocks) if i not in dst]
    assert torch.equal(receiver.kv_cache[untouched], before[untouched])


def test_start_pull_moves_exactly_the_listed_blocks(pair):
    sender, receiver = pair
    before = receiver.kv_cache.clone()
    src, dst = [3, 17, 18, 19, 39, 0], [5, 0, 1, 2, 23, 11]  # a run of three, out-of-order, both ends
    assert transfer(sender, receiver, src, dst) is TransferState.DONE
    assert_moved(sender, receiver, before, src, dst)


def test_pull_from_an_event_loop(pair):
    sender, receiver = pair
    before = receiver.kv_cache.clone()
    src, dst = [30, 2, 9], [4, 20, 7]
    asyncio.run(pull_and_serve(sender, receiver, src, dst))
    assert_moved(sender, receiver, before, src, dst)


def test_empty_pull_is_done(pair):
    sender, receiver = pair
    handle = receiver.start_pull(sender.name, [], [])
    assert receiver.poll(handle) is TransferState.DONE
    receiver.release(handle)


def test_unknown_peer_and_bad_ids(pair):
    sender, receiver = pair
    with pytest.raises(KVTransferError, match="unknown peer 'nobody'.*add_peer"):
        receiver.start_pull("nobody", [0], [0])
    with pytest.raises(ValueError, match="2 source blocks but 1 destination"):
        receiver.start_pull(sender.name, [0, 1], [0])
    with pytest.raises(ValueError, match=r"source block ids must be in \[0, 40\)"):
        receiver.start_pull(sender.name, [40], [0])
    with pytest.raises(ValueError, match=r"destination block ids must be in \[0, 24\)"):
        receiver.start_pull(sender.name, [0], [-1])
    receiver.remove_peer(sender.name)
    receiver.remove_peer(sender.name)
    with pytest.raises(KVTransferError, match="unknown peer"):
        receiver.start_pull(sender.name, [0], [0])


def test_add_peer_is_idempotent(pair):
    sender, receiver = pair
    receiver.add_peer(sender.peer_info())
    asyncio.run(pull_and_serve(sender, receiver, [1], [1]))
    assert torch.equal(receiver.kv_cache[1], sender.kv_cache[1])


MISMATCHES = [("head_dim", 64), ("model_id", "other"), ("dtype", "bfloat16"), ("device_type", "cuda")]


@pytest.mark.parametrize("field, value", MISMATCHES)
def test_layout_mismatch_names_the_field(kind, field, value):
    receiver = transport(kind, 8, seed=0)
    other = layout(8, **{field: value})
    info = PeerInfo(name="peer", transport=kind, layout=other, base_address=0)
    try:
        with pytest.raises(ValueError, match=f"{field} is"):
            receiver.add_peer(info)
    finally:
        receiver.close()


def test_transport_kinds_must_match(kind):
    receiver = transport(kind, 8, seed=0)
    other = "local" if kind == "nixl" else "nixl"
    info = PeerInfo(name="peer", transport=other, layout=layout(8), base_address=0)
    try:
        with pytest.raises(ValueError, match=f"uses the '{other}' transport"):
            receiver.add_peer(info)
    finally:
        receiver.close()


def test_close_is_idempotent_and_final(pair):
    sender, receiver = pair
    handle = receiver.start_pull(sender.name, [0], [0])
    receiver.close()
    receiver.close()
    receiver.release(handle)
    with pytest.raises(KVTransferError, match="closed"):
        receiver.start_pull(sender.name, [0], [0])


def test_cache_must_match_layout():
    with pytest.raises(ValueError, match="layout says 9 blocks"):
        make_transport("local", "bad-shape", cache(8, 0), layout(9))
    with pytest.raises(ValueError, match="contiguous"):
        make_transport("local", "bad-stride", cache(8, 0).transpose(0, 1), layout(8))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown KV transport 'pigeon'.*'local', 'nccl', 'nixl'"):
        make_transport("pigeon", "x", cache(2, 0), layout(2))


def test_nixl_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl", None)
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    with pytest.raises(ImportError, match="needs the nixl package"):
        make_transport("nixl", "no-nixl", cache(2, 0), layout(2))


def test_local_names_are_unique_per_process():
    first = transport("local", 2, seed=0)
    with pytest.raises(ValueError, match="already exists"):
        make_transport("local", first.name, cache(2, 0), layout(2))
    first.close()
    make_transport("local", first.name, cache(2, 0), layout(2)).close()


def test_local_pull_from_a_closed_peer_fails():
    sender, receiver = transport("local", 4, seed=1), transport("local", 4, seed=2)
    receiver.add_peer(sender.peer_info())
    sender.close()
    handle = receiver.start_pull(sender.name, [0], [0])
    assert receiver.poll(handle) is TransferState.FAILED
    assert "closed" in receiver.error(handle)
    with pytest.raises(KVTransferError, match="failed: peer .* has closed"):
        asyncio.run(receiver.pull(sender.name, [0], [0], timeout_s=1.0))
    receiver.close()


def test_local_peer_must_be_in_this_process():
    receiver = transport("local", 4, seed=0)
    info = PeerInfo(name="elsewhere", transport="local", layout=layout(4), base_address=1234)
    with pytest.raises(ValueError, match="in-process"):
        receiver.add_peer(info)
    receiver.close()


def test_nixl_split_pull_through_the_thread_pool():
    pytest.importorskip("nixl")
    sender = transport("nixl", 64, seed=3)
    receiver = transport("nixl", 64, seed=4, num_threads=2, split_bytes=1)  # every pull is split and pooled
    try:
        receiver.add_peer(sender.peer_info())
        before = receiver.kv_cache.clone()
        src, dst = list(range(10, 50)), list(range(63, 23, -1))
        asyncio.run(receiver.pull(sender.name, src, dst, timeout_s=5.0))
        assert_moved(sender, receiver, before, src, dst)
        handle = receiver.start_pull(sender.name, [1, 2, 3], [4, 5, 6])
        receiver.release(handle)  # released while possibly pending: waits for the posted copies
    finally:
        receiver.close()
        sender.close()


def test_nixl_rejects_itself_as_peer():
    pytest.importorskip("nixl")
    t = transport("nixl", 4, seed=0)
    try:
        with pytest.raises(ValueError, match="itself"):
            t.add_peer(t.peer_info())
    finally:
        t.close()


class _Stuck(KVTransport):
    """A transport whose transfers never finish, to test `pull`'s timeout and release."""

    kind = "stuck"

    def __init__(self):
        super().__init__("stuck", cache(2, 0), layout(2))
        self.polls, self.released = 0, []

    def peer_info(self):
        raise NotImplementedError

    def add_peer(self, info):
        pass

    def remove_peer(self, name):
        pass

    def start_pull(self, peer, src_block_ids, dst_block_ids, key=0):
        return 7

    def poll(self, handle):
        self.polls += 1
        return TransferState.PENDING

    def release(self, handle):
        self.released.append(handle)

    def close(self):
        pass


def test_pull_times_out_with_backoff_and_releases():
    t = _Stuck()
    with pytest.raises(KVTransferError, match="timed out after 0.05 s"):
        asyncio.run(t.pull("peer", [0], [0], timeout_s=0.05))
    assert t.released == [7]
    assert 2 < t.polls < 200  # sleeps between polls, does not spin


def test_nixl_peer_can_be_removed_and_added_again():
    pytest.importorskip("nixl")
    sender, receiver = transport("nixl", 8, seed=5), transport("nixl", 8, seed=6)
    try:
        receiver.add_peer(sender.peer_info())
        receiver.remove_peer(sender.name)
        receiver.add_peer(sender.peer_info())
        asyncio.run(receiver.pull(sender.name, [3], [4], timeout_s=5.0))
        assert torch.equal(receiver.kv_cache[4], sender.kv_cache[3])
    finally:
        receiver.close()
        sender.close()


def test_nixl_agents_do_not_spin_when_idle():
    """No progress thread by default: two connected agents cost no CPU while nothing moves (a 2-core host)."""
    pytest.importorskip("nixl")
    sender, receiver = transport("nixl", 8, seed=7), transport("nixl", 8, seed=8)
    try:
        receiver.add_peer(sender.peer_info())
        asyncio.run(receiver.pull(sender.name, [0], [0], timeout_s=5.0))
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(0.5)
        after = resource.getrusage(resource.RUSAGE_SELF)
        busy = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        assert busy < 0.1, f"{busy:.2f} s of CPU in 0.5 s idle"
    finally:
        receiver.close()
        sender.close()


def nixl_from_config(num_blocks: int, seed: int, **nixl) -> KVTransport:
    """A NIXL transport built as a worker builds it: from the `kv` section of a loaded config."""
    kv = load_config(overrides={"kv": {"nixl": nixl}}, env=False).kv
    return transport("nixl", num_blocks, seed, **transport_options(kv))


def test_nixl_config_keys_reach_the_agent():
    """kv.nixl's UCX keys are the agent's UCX backend parameters, as the agent reports them; the defaults
    keep UCX's peer-failure mode off (no progress thread to drive it)."""
    pytest.importorskip("nixl")
    default = nixl_from_config(4, seed=0)
    tuned = nixl_from_config(4, seed=1, ucx_devices="lo", num_threads=3)
    try:
        assert default._agent.get_backend_params("UCX")["ucx_error_handling_mode"] == "none"
        params = tuned._agent.get_backend_params("UCX")
        assert params["ucx_devices"] == "lo" and params["num_workers"] == "3" and tuned._num_threads == 3
    finally:
        tuned.close()
        default.close()


def test_nixl_progress_thread_and_peer_mode_from_the_config_move_blocks():
    """What the Helm chart sets across nodes: the progress thread runs (it spins: CPU while idle, where the
    default agents cost none, see above) and UCX's peer mode is on; a pull completes under both."""
    pytest.importorskip("nixl")
    sender = nixl_from_config(8, seed=9, progress_thread=True, ucx_error_handling_mode="peer")
    receiver = nixl_from_config(8, seed=10, progress_thread=True, ucx_error_handling_mode="peer")
    try:
        assert receiver._agent.get_backend_params("UCX")["ucx_error_handling_mode"] == "peer"
        receiver.add_peer(sender.peer_info())
        before = receiver.kv_cache.clone()
        asyncio.run(receiver.pull(sender.name, [1, 2], [5, 6], timeout_s=5.0))
        assert_moved(sender, receiver, before, [1, 2], [5, 6])
        start = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(0.3)
        end = resource.getrusage(resource.RUSAGE_SELF)
        busy = end.ru_utime - start.ru_utime + end.ru_stime - start.ru_stime
        assert busy > 0.1, f"only {busy:.2f} s of CPU in 0.3 s: no progress thread polling"
    finally:
        receiver.close()
        sender.close()


def test_nixl_refuses_unknown_options_and_peer_mode_without_progress():
    pytest.importorskip("nixl")
    with pytest.raises(ValueError, match="progres_thread"):
        transport("nixl", 2, seed=0, progres_thread=True)
    with pytest.raises(ValueError, match="ucx_error_handling_mode"):
        transport("nixl", 2, seed=0, ucx_error_handling_mode="peer")


def collective_pair(num_blocks: int = 16, **options):
    sender, receiver = (
        transport("nccl", num_blocks, seed=11, **options),
        transport("nccl", num_blocks, seed=12, **options),
    )
    receiver.add_peer(sender.peer_info())
    sender.add_peer(receiver.peer_info())
    return sender, receiver


def test_collective_concurrent_keys_do_not_mix():
    threads = threading.active_count()
    sender, receiver = collective_pair()
    try:
        before = receiver.kv_cache.clone()
        serves = [sender.start_serve(receiver.name, [1, 2, 3], 7), sender.start_serve(receiver.name, [9, 4], 8)]
        pulls = [
            receiver.start_pull(sender.name, [9, 4], [0, 5], 8),
            receiver.start_pull(sender.name, [1, 2, 3], [8, 6, 7], 7),
        ]
        for t, handles in ((receiver, pulls), (sender, serves)):
            for h in handles:
                assert wait(t, h) is TransferState.DONE, t.error(h)
                t.release(h)
        assert_moved(sender, receiver, before, [9, 4, 1, 2, 3], [0, 5, 8, 6, 7])
    finally:
        receiver.close()
        sender.close()
        receiver.close()
    assert threading.active_count() == threads  # no pool, cancel or watcher thread outlives close


class _TagBlind:
    """A Gloo group that ignores data tags the way NCCL does (ops match in posting order) and logs, in order, when
    each data op is posted and when its wait returns."""

    def __init__(self, pg, log: list):
        self.pg, self.log = pg, log

    def send(self, tensors, rank, tag):
        return self._op(self.pg.send, tensors, rank, tag)

    def recv(self, tensors, rank, tag):
        return self._op(self.pg.recv, tensors, rank, tag)

    def _op(self, post, tensors, rank, tag):
        if tag < collective._FIRST_TAG:  # the watcher's sentinel and the abort keep their tags
            return post(tensors, rank, tag)
        self.log.append(("post", tag))
        work = post(tensors, rank, collective._FIRST_TAG)
        log = self.log

        class Work:
            def wait(self, timeout):
                work.wait(timeout)
                log.append(("done", tag))

        return Work()


def test_collective_serialized_mode_keeps_concurrent_transfers_apart(monkeypatch):
    """`serialize=True` (NCCL's default) over a tag-blind Gloo group: transfers of different sizes started in
    opposite orders on the two ends land right, each end running one data op at a time, in the same order."""
    logs = {0: [], 1: []}
    gloo = collective.dist.ProcessGroupGloo
    monkeypatch.setattr(
        collective.dist,
        "ProcessGroupGloo",
        lambda store, rank, size, t: _TagBlind(gloo(store, rank, size, t), logs[rank]),
    )
    sender, receiver = collective_pair(32, serialize=True)
    try:
        before = receiver.kv_cache.clone()
        jobs = [([1, 2, 3], [8, 6, 7]), ([9, 4], [0, 5]), ([20], [21]), ([11, 12, 13, 14], [1, 2, 3, 4]), ([31], [9])]
        serves = [sender.start_serve(receiver.name, src, key) for key, (src, _) in enumerate(jobs)]
        pulls = [receiver.start_pull(sender.name, src, dst, key) for key, (src, dst) in reversed(list(enumerate(jobs)))]
        for t, handles in ((receiver, pulls), (sender, serves)):
            for h in handles:
                assert wait(t, h) is TransferState.DONE, t.error(h)
                t.release(h)
        assert_moved(sender, receiver, before, *(sum(side, []) for side in zip(*jobs)))
    finally:
        receiver.close()
        sender.close()
    for log in logs.values():
        tags = [tag for _, tag in log[::2]]
        assert log == [(event, tag) for tag in tags for event in ("post", "done")]  # one op at a time
        assert tags == sorted(tags) and len(set(tags)) == len(jobs)
    assert logs[0] == logs[1]


@pytest.mark.parametrize("serve_first", [True, False])
def test_collective_either_side_may_start_first(serve_first):
    sender, receiver = collective_pair()
    try:
        before = receiver.kv_cache.clone()
        for key, (src, dst) in enumerate([([3], [4]), ([5, 6], [1, 0])]):  # the second reuses the pair's group
            if serve_first:
                served = sender.start_serve(receiver.name, src, key)
                time.sleep(0.05)
                pulled = receiver.start_pull(sender.name, src, dst, key)
            else:
                pulled = receiver.start_pull(sender.name, src, dst, key)
                time.sleep(0.05)
                served = sender.start_serve(receiver.name, src, key)
            assert wait(receiver, pulled) is TransferState.DONE, receiver.error(pulled)
            assert wait(sender, served) is TransferState.DONE, sender.error(served)
            receiver.release(pulled)
            sender.release(served)
        assert_moved(sender, receiver, before, [3, 5, 6], [4, 1, 0])
    finally:
        receiver.close()
        sender.close()


def test_collective_pull_without_a_serve_times_out_and_leaves_dst_alone():
    sender, receiver = collective_pair(timeout_s=2.0)  # close() waits out the unanswered handshake
    try:
        before = receiver.kv_cache.clone()
        start = time.monotonic()
        with pytest.raises(KVTransferError, match="timed out after 0.2 s"):
            asyncio.run(receiver.pull(sender.name, [1], [2], timeout_s=0.2, key=5))
        assert time.monotonic() - start < 2.0
        assert not receiver._transfers  # released
        served = sender.start_serve(receiver.name, [1], 5)  # a late serve meets the cancelled pull, not a hang
        assert wait(sender, served) is TransferState.FAILED
        sender.release(served)
        asyncio.run(pull_and_serve(sender, receiver, [3], [3], key=6))  # the pair still works
        assert torch.equal(receiver.kv_cache[2], before[2])
        assert torch.equal(receiver.kv_cache[3], sender.kv_cache[3])
    finally:
        receiver.close()
        sender.close()


def test_collective_remove_fails_pending_and_re_adding_reconnects():
    sender, receiver = collective_pair(timeout_s=2.0)  # close() waits out the unanswered handshake
    try:
        asyncio.run(pull_and_serve(sender, receiver, [0], [0], key=1))
        handle = receiver.start_pull(sender.name, [1], [1], 2)
        receiver.remove_peer(sender.name)
        assert receiver.poll(handle) is TransferState.FAILED
        assert "removed" in receiver.error(handle)
        receiver.release(handle)
        receiver.add_peer(sender.peer_info())
        asyncio.run(pull_and_serve(sender, receiver, [4], [5], key=3))  # a fresh group at a new generation
        assert torch.equal(receiver.kv_cache[5], sender.kv_cache[4])
    finally:
        receiver.close()
        sender.close()


def test_collective_serve_to_an_unknown_peer():
    sender, receiver = collective_pair()
    try:
        with pytest.raises(KVTransferError, match="unknown peer"):
            sender.start_serve("nobody", [0], 1)
        with pytest.raises(ValueError, match="source block ids"):
            sender.start_serve(receiver.name, [99], 1)
    finally:
        receiver.close()
        sender.close()
