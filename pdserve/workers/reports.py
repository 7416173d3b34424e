"""A worker's heartbeat: load and KV events pushed to the controller, and a full prefix-cache snapshot
when the controller asks to resync (a gap, or a restarted controller that lost its index)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from pdserve.protocol import KVEventBatch

log = logging.getLogger(__name__)


async def report_loop(worker) -> None:
    epoch, seq, failing = uuid.uuid4().hex, 0, False
    while True:
        try:
            raw, events = await worker.loop.call(lambda e: (e.stats(), e.take_kv_events()))
            seq += 1
            batch = KVEventBatch(worker_id=worker.worker_id, epoch=epoch, seq=seq, events=events)
            controller = worker._controller
            if not await asyncio.wait_for(controller.report.remote(worker.wrap_stats(raw), batch), 5.0):
                seq += 1
                hashes = await worker.loop.call(lambda e: e.kv_snapshot())
                await asyncio.wait_for(controller.resync.remote(worker.worker_id, epoch, seq, hashes), 5.0)
            if failing:
                log.warning("reports to the controller go through again")
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a restarting controller must not kill the worker; the next report resyncs
            if not failing:
                log.warning("report to the controller failed (%r); retrying", e)
            failing = True
            seq += 1  # a gap: the controller will ask for a resync
        await asyncio.sleep(worker.options.report_interval_s)
