"""NIXL KV pulls between two Ray actors (separate processes): PeerInfo through Ray, exact blocks, dead senders."""

import hashlib
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")

pytestmark = pytest.mark.ray

NUM_BLOCKS = 64


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, namespace="pdserve-kv-test", log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.5)
class CacheHolder:
    """A worker stand-in: a random CPU "KV cache" and a NIXL transport over it."""

    def __init__(self, name: str, seed: int, **options):
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
        self.transport = make_transport("nixl", name, self.kv, layout, **options)

    def peer_info(self):
        return self.transport.peer_info()

    def add_peer(self, info) -> str:
        self.transport.add_peer(info)
        return type(info).__name__

    async def pull(self, peer: str, src: list[int], dst: list[int], timeout_s: float = 10.0) -> None:
        await self.transport.pull(peer, src, dst, timeout_s=timeout_s)

    def checksums(self) -> list[str]:
        return [hashlib.blake2b(self.kv[i].numpy().tobytes(), digest_size=16).hexdigest() for i in range(NUM_BLOCKS)]

    def close(self) -> None:
        self.transport.close()
        self.transport.close()


def connected_pair(prefix: str, **receiver_options):
    sender = CacheHolder.remote(f"{prefix}-sender", seed=1)
    receiver = CacheHolder.remote(f"{prefix}-receiver", seed=2, **receiver_options)
    info = ray.get(sender.peer_info.remote())
    assert ray.get(receiver.add_peer.remote(info)) == "PeerInfo"  # a msgspec struct survives Ray's pickling
    return sender, receiver


def check_pull(sender, receiver, peer: str, src: list[int], dst: list[int]) -> None:
    before = ray.get(receiver.checksums.remote())
    ray.get(receiver.pull.remote(peer, src, dst))
    theirs, ours = ray.get([sender.checksums.remote(), receiver.checksums.remote()])
    assert [ours[d] for d in dst] == [theirs[s] for s in src]
    untouched = [i for i in range(NUM_BLOCKS) if i not in dst]
    assert [ours[i] for i in untouched] == [before[i] for i in untouched]


def test_peer_info_crosses_ray_and_pulls_move_the_right_blocks():
    sender, receiver = connected_pair("a")
    check_pull(sender, receiver, "a-sender", [5, 40, 41, 42, 63, 0], [9, 1, 2, 3, 60, 33])
    check_pull(sender, receiver, "a-sender", [7], [7])  # a second pull over the same connection
    ray.get([receiver.close.remote(), sender.close.remote()])


def test_large_pull_split_over_the_post_pool():
    sender, receiver = connected_pair("b", num_threads=2, split_bytes=1 << 20)
    src = list(range(0, 64, 2)) + list(range(1, 64, 2))  # 4 MB: two runs of strided blocks
    check_pull(sender, receiver, "b-sender", src, list(reversed(range(64))))
    ray.get([receiver.close.remote(), sender.close.remote()])


def test_pull_from_a_dead_sender_fails_fast():
    sender, receiver = connected_pair("c")
    ray.get(receiver.pull.remote("c-sender", [1], [1]))
    ray.kill(sender, no_restart=True)
    time.sleep(0.5)  # let the process go
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="KVTransferError"):
        ray.get(receiver.pull.remote("c-sender", [2, 3], [2, 3], 5.0))
    assert time.monotonic() - start < 4.0  # FAILED from the transport, not the timeout
    ray.get(receiver.close.remote())
