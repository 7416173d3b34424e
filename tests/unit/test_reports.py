"""The heartbeat goes on while the engine is busy in a long step (a big prefill chunk on a CPU can take
seconds): a busy worker must not look dead to the controller."""

from __future__ import annotations

import asyncio
import time

from pdserve.config import EngineConfig, WorkerConfig
from pdserve.workers.worker import Worker


class Controller:
    def __init__(self) -> None:
        self.reports: list[float] = []
        me = self

        class _Report:
            @staticmethod
            def remote(stats, batch):
                me.reports.append(time.monotonic())
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(True)
                return fut

        self.report = _Report()


def test_reports_continue_while_the_engine_is_in_a_long_step():
    async def main():
        w = Worker("busy", "colocated", EngineConfig(num_kv_blocks=32), WorkerConfig(report_interval_s=0.05), "local")
        controller = Controller()
        try:
            w.set_controller(controller)
            await asyncio.sleep(0.3)
            w.engine_thread.submit(lambda e: time.sleep(1.5))  # the engine thread is stuck in one long step
            t0 = time.monotonic()
            await asyncio.sleep(1.5)
            during = [t for t in controller.reports if t0 + 0.1 < t < t0 + 1.4]
            assert len(during) >= 10, f"only {len(during)} heartbeats while the engine was busy"
        finally:
            await w.shutdown()

    asyncio.run(main())


def test_a_kv_event_batch_crosses_msgpack_and_back():
    """The wire record decodes as declared (its events a tagged union), not only through Ray's pickling."""
    import msgspec

    from pdserve.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    batch = KVEventBatch(worker_id="w", epoch="e", seq=3, events=[
        BlockStored(block_hashes=[b"a" * 16, b"b" * 16], parent_hash=None),
        BlockStored(block_hashes=[b"c" * 16], parent_hash=b"b" * 16),
        BlockRemoved(block_hashes=[b"a" * 16]),
        AllBlocksCleared(),
    ])  # fmt: skip
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=KVEventBatch) == batch
