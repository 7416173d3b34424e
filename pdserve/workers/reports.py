"""A worker's heartbeat: load and KV events pushed to the controller, and a full prefix-cache snapshot
when the controller asks to resync (a gap, or a restarted controller that lost its index).

The heartbeat never waits on the engine: while a long step runs (a big prefill chunk can take seconds on a
CPU) it repeats the last numbers, so a busy engine is not mistaken for a dead worker; the fresh numbers and
events follow as soon as the step ends. A broken engine ends the worker's process instead (engine_thread)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from pdserve.protocol import KVEventBatch

log = logging.getLogger(__name__)


async def report_loop(worker) -> None:
    epoch, seq, failing = uuid.uuid4().hex, 0, False
    raw, pending = None, None  # the last engine numbers; the engine call still running, if any
    while True:
        try:
            if pending is None:
                # after a step: its batch is formed, so the report's waiting requests are those without a slot
                stats = worker.engine_thread.call(lambda e: (e.stats(), e.take_kv_events()), after_step=True)
                pending = asyncio.ensure_future(stats)
            done, _ = await asyncio.wait([pending], timeout=worker.options.report_interval_s)
            events = []
            if done:
                (raw, events), pending = pending.result(), None
            if raw is not None:
                seq += 1
                batch = KVEventBatch(worker_id=worker.worker_id, epoch=epoch, seq=seq, events=events)
                controller = worker._controller
                if not await asyncio.wait_for(controller.report.remote(worker.wrap_stats(raw), batch), 5.0):
                    seq += 1
                    hashes = await worker.engine_thread.call(lambda e: e.kv_snapshot())
                    await asyncio.wait_for(controller.resync.remote(worker.worker_id, epoch, seq, hashes), 5.0)
            if failing:
                log.warning("reports to the controller go through again")
            failing = False
        except asyncio.CancelledError:
            if pending is not None:
                pending.cancel()
            raise
        except Exception as e:  # a restarting controller must not kill the worker; the next report resyncs
            pending = None if pending is not None and pending.done() else pending
            if not failing:
                log.warning("report to the controller failed (%r); retrying", e)
            failing = True
            seq += 1  # a gap: the controller will ask for a resync
        if pending is None or pending.done():
            await asyncio.sleep(worker.options.report_interval_s)
