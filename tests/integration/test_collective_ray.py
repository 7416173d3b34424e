"""Collective (Gloo) KV transfers between two Ray actors in separate processes: PeerInfo through Ray, the
sender's serve beside the receiver's pull, exact blocks, and a killed sender failing the pull fast."""

import hashlib
import time

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

NUM_BLOCKS = 64


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, namespace="pdserve-collective-test", log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.5)
class CacheHolder:
    """A worker stand-in: a random CPU "KV cache" and a collective transport over it."""

    def __init__(self, name: str, seed: int):
        import torch

        from pdserve.kv import make_transport
        from pdserve.protocol import KVLayout

        shape = (NUM_BLOCKS, 4, 2, 16, 2, 64)  # 64 KB blocks of float32
        self.kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        layout = KVLayout(
            model_id="tiny",
            dtype="float32",
            block_size=16,
            num_layers=4,
            num_kv_heads=2,
            head_dim=64,
            num_blocks=NUM_BLOCKS,
            block_bytes=self.kv[0].numel() * 4,
        )
        self.transport = make_transport("nccl", name, self.kv, layout, timeout_s=5.0)

    def peer_info(self):
        return self.transport.peer_info()

    def add_peer(self, info) -> str:
        self.transport.add_peer(info)
        return type(info).__name__

    async def pull(self, peer: str, src: list[int], dst: list[int], key: int, timeout_s: float = 10.0) -> None:
        await self.transport.pull(peer, src, dst, timeout_s=timeout_s, key=key)

    async def serve(self, peer: str, src: list[int], key: int, timeout_s: float = 10.0) -> None:
        await self.transport.serve(peer, src, key, timeout_s)

    def checksums(self) -> list[str]:
        return [hashlib.blake2b(self.kv[i].numpy().tobytes(), digest_size=16).hexdigest() for i in range(NUM_BLOCKS)]

    def close(self) -> None:
        self.transport.close()
        self.transport.close()


def connected_pair(prefix: str, sender: str = ""):
    sender = CacheHolder.remote(sender or f"{prefix}-sender", seed=1)
    receiver = CacheHolder.remote(f"{prefix}-receiver", seed=2)
    s_info, r_info = ray.get([sender.peer_info.remote(), receiver.peer_info.remote()])
    assert ray.get(receiver.add_peer.remote(s_info)) == "PeerInfo"  # a msgspec struct survives Ray's pickling
    assert ray.get(sender.add_peer.remote(r_info)) == "PeerInfo"
    return sender, receiver


def check_pull(sender, receiver, prefix: str, src: list[int], dst: list[int], key: int, sender_name: str = ""):
    before = ray.get(receiver.checksums.remote())
    peer = sender_name or f"{prefix}-sender"
    ray.get([receiver.pull.remote(peer, src, dst, key), sender.serve.remote(f"{prefix}-receiver", src, key)])
    theirs, ours = ray.get([sender.checksums.remote(), receiver.checksums.remote()])
    assert [ours[d] for d in dst] == [theirs[s] for s in src]
    untouched = [i for i in range(NUM_BLOCKS) if i not in dst]
    assert [ours[i] for i in untouched] == [before[i] for i in untouched]


def test_peer_info_crosses_ray_and_pulls_move_the_right_blocks():
    sender, receiver = connected_pair("a")
    check_pull(sender, receiver, "a", [5, 40, 41, 42, 63, 0], [9, 1, 2, 3, 60, 33], key=11)
    check_pull(sender, receiver, "a", [7], [7], key=12)  # a second pull over the same group
    ray.get([receiver.close.remote(), sender.close.remote()])


@pytest.mark.parametrize("prefix", ["c", "d"])
def test_pull_from_a_dead_sender_fails_fast(prefix):
    if prefix == "d":  # the sender hosts the pair's store: rename so it sorts first
        sender, receiver = connected_pair(prefix, sender="d-a-sender")
    else:
        sender, receiver = connected_pair(prefix)
    name = ray.get(sender.peer_info.remote()).name
    check_pull(sender, receiver, prefix, [1], [1], key=1, sender_name=name)
    ray.kill(sender, no_restart=True)
    time.sleep(0.5)  # let the process go
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="KVTransferError"):
        ray.get(receiver.pull.remote(name, [2, 3], [2, 3], 2, 8.0))
    assert time.monotonic() - start < 4.0  # FAILED from the transport, not the timeout
    ray.get(receiver.close.remote())


def test_concurrent_pulls_started_in_opposite_orders():
    """Two transfers at once between the same pair, serves and pulls posted in opposite orders (a handshake
    waiting for one must not hold up the other's)."""
    sender, receiver = connected_pair("e")
    before = ray.get(receiver.checksums.remote())
    jobs = {21: ([1, 2, 3], [10, 11, 12]), 22: ([40], [41]), 23: ([7, 8], [5, 6])}
    refs = [sender.serve.remote("e-receiver", src, key) for key, (src, _) in jobs.items()]
    refs += [receiver.pull.remote("e-sender", src, dst, key) for key, (src, dst) in reversed(jobs.items())]
    start = time.monotonic()
    ray.get(refs)
    assert time.monotonic() - start < 4.0  # no handshake sat out its 5 s timeout
    theirs, ours = ray.get([sender.checksums.remote(), receiver.checksums.remote()])
    moved = {d: s for src, dst in jobs.values() for s, d in zip(src, dst)}
    assert ours == [theirs[moved[i]] if i in moved else before[i] for i in range(NUM_BLOCKS)]
    ray.get([receiver.close.remote(), sender.close.remote()])
