"""Ray actor classes for the three worker roles; each owns one engine on its own device.

`start()` builds the engine inside the actor's event loop (construction allocates the KV cache and
registers it with the transport), so peers can be wired before the first request arrives.
"""

from __future__ import annotations

import logging
import os
import sys

import ray

from pdserve.config import EngineConfig, KVConfig, MigrationConfig, WorkerConfig
from pdserve.protocol import EngineRequest, KVHandoff, MigrationFinal, MigrationStage, PeerInfo


class _WorkerActor:
    role = ""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        options: WorkerConfig,
        transport: KVConfig,
        migration: MigrationConfig | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self._args = (worker_id, config, options, transport, migration, max_waiting)
        self._note: dict = {}
        self.w = None  # the Worker, built by start()

    async def start(self) -> PeerInfo:
        if self.w is None:
            from pdserve.workers.worker import Worker  # here: whoever creates the actor need not load torch

            worker_id, config, options, transport, migration, max_waiting = self._args
            self.w = Worker(worker_id, self.role, config, options, transport, _exit_process, migration, max_waiting)
            self.w.self_handle = ray.get_runtime_context().current_actor
        return self.w.peer_info()

    async def add_peers(self, infos: list[PeerInfo]) -> None:
        self.w.add_peers(infos)

    async def info(self):
        return self.w.info()

    async def keep_note(self, note: dict) -> None:
        """The controller's desired state (pool targets), replicated on every worker so a restarted
        controller gets it back from any survivor; the newest (by `time`) wins."""
        if note.get("time", 0) >= self._note.get("time", 0):
            self._note = note

    async def note(self) -> dict:
        return self._note

    async def set_controller(self, handle) -> None:
        self.w.set_controller(handle)

    async def wait_closed(self) -> None:
        await self.w.wait_closed()

    async def ping(self) -> bool:
        return True

    async def health(self) -> bool:
        return await self.w.health()

    async def stats(self):
        return await self.w.stats()

    async def drain(self) -> None:
        await self.w.drain()

    async def inject_fault(self, kind: str) -> None:
        self.w.inject_fault(kind)

    async def leak_report(self) -> str | None:
        return await self.w.leak_report()

    async def shutdown(self) -> None:
        if self.w is not None:
            await self.w.shutdown()

    async def poll_outputs(self, timeout_s: float = 1.0, consumer: str = ""):
        return await self.w.poll_outputs(timeout_s, consumer)

    async def abort(self, request_ids: list[str]) -> None:
        await self.w.abort(request_ids)

    async def generate(self, req: EngineRequest):
        return await self.w.generate(req)

    # ---- the handoff: every role can send (a prefill's blocks, a migration's source) ----
    async def confirm(self, request_id: str) -> bool:
        return await self.w.confirm(request_id)

    async def serve_kv(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        await self.w.serve_kv(receiver, block_ids, key, timeout_s)

    async def find(self, request_id: str) -> list[str]:
        return self.w.find(request_id)

    async def migratable(self) -> list[tuple[str, int]]:
        return await self.w.migratable()

    async def migrate(self, request_id: str, target: str, target_handle, reason: str = "operator", mode="multi_stage"):
        return await self.w.migrate(request_id, target, target_handle, reason, mode)

    async def migrate_drop(self, migration_id: str) -> None:
        await self.w.migrate_drop(migration_id)


def _exit_process(error: BaseException) -> None:
    """A broken engine ends its actor's process: Ray reports the death to every caller and to the
    router's and frontends' watchers, and the worker never takes a request it cannot serve."""
    logging.getLogger(__name__).critical("worker process exits: its engine failed (%r)", error)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class _PrefillMixin:
    async def prefill(self, req: EngineRequest, decode_worker: str = "", decode_handle=None):
        return await self.w.prefill(req, decode_worker, decode_handle)


class _DecodeMixin:
    async def reserve(self, req: EngineRequest):
        return await self.w.reserve(req)

    async def decode(self, handoff: KVHandoff, prefill_handle=None, reply_to: str = ""):
        return await self.w.decode(handoff, prefill_handle, reply_to)

    async def migrate_stage(self, stage: MigrationStage, source_handle):
        return await self.w.migrate_stage(stage, source_handle)

    async def migrate_finish(self, final: MigrationFinal, source_handle):
        return await self.w.migrate_finish(final, source_handle)


@ray.remote
class PrefillWorker(_PrefillMixin, _WorkerActor):
    role = "prefill"


@ray.remote
class DecodeWorker(_DecodeMixin, _WorkerActor):
    role = "decode"


@ray.remote
class ColocatedWorker(_PrefillMixin, _DecodeMixin, _WorkerActor):
    role = "colocated"


ACTOR_CLASSES = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}
