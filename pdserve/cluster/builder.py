"""Build a deployment from one validated `ServeConfig`: Ray, worker actors, peer wiring, the scheduler.

Peers exchange transport metadata here, at start-up, so the first request pays no connection set-up.
`Deployment.shutdown()` is idempotent and stops only what this deployment started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass

import ray

from pdserve.cluster.client import ClusterClient
from pdserve.config import ROLES, ServeConfig
from pdserve.model_info import load_model_info
from pdserve.scheduler.router import RouterConfig

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    config: ServeConfig
    client: ClusterClient
    scheduler: object
    handles: dict[str, object]
    started_ray: bool
    _closed: bool = False

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.client.shutdown()
        for handle in [*self.handles.values(), self.scheduler]:
            try:
                ray.kill(handle)
            except Exception:  # already dead
                pass
        if self.started_ray:
            ray.shutdown()


def _init_ray(config: ServeConfig) -> bool:
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="pdserve", log_to_driver=True)
        return False
    cpus = max(os.cpu_count() or 1, config.pools.total + 1)  # logical CPUs: one per actor even on 2 cores
    ray.init(num_cpus=cpus, include_dashboard=False, namespace="pdserve", log_to_driver=True)
    return True


def _worker_resources(config: ServeConfig, role: str) -> dict:
    cpus = config.worker.cpus if config.worker.cpus is not None else 1
    pinned = {"resources": dict(config.pools.resources[role])} if role in config.pools.resources else {}
    if config.engine.device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": cpus, **pinned}
    # CPU KV caches on transparent huge pages: NIXL's same-host READ (CMA) moves them ~1.5-2x faster
    # (bench/kv_transfer.py: 10.2 -> 15.8 GB/s scattered at 256 MB)
    return {"num_cpus": cpus, "runtime_env": {"env_vars": {"THP_MEM_ALLOC_ENABLE": "1"}}, **pinned}


async def build(config: ServeConfig, metrics=None) -> Deployment:
    from pdserve.scheduler.router import GlobalScheduler
    from pdserve.workers.actors import ACTOR_CLASSES

    started = _init_ray(config)
    info = load_model_info(config.engine.model, config.engine.max_model_len)
    options = config.worker
    if options.torch_threads is None and not config.address:
        options = options.replace(torch_threads=max(1, (os.cpu_count() or 1) // config.pools.total))
    tag = uuid.uuid4().hex[:6]
    roles = [role for role in ROLES for _ in range(config.pools.size(role))]
    handles, role_of = {}, {}
    counts: dict[str, int] = {}
    for role in roles:
        worker_id = f"{role}-{counts.setdefault(role, 0)}-{tag}"
        counts[role] += 1
        engine = config.engine
        if engine.device.startswith("cuda"):
            engine = engine.replace(device="cuda")  # Ray gives each actor its own GPU as cuda:0
        handles[worker_id] = (
            ACTOR_CLASSES[role]
            .options(name=f"pdserve-{worker_id}", **_worker_resources(config, role))
            .remote(worker_id, engine, options, config.kv.transport)
        )
        role_of[worker_id] = role
    try:
        infos = await asyncio.gather(*(h.start.remote() for h in handles.values()))
        await asyncio.gather(*(h.add_peers.remote(list(infos)) for h in handles.values()))
        scheduler = GlobalScheduler.options(name=f"pdserve-scheduler-{tag}").remote(RouterConfig.of(config))
        await scheduler.register.remote(list(role_of.items()))
        await asyncio.gather(*(h.set_scheduler.remote(scheduler) for h in handles.values()))
    except BaseException:
        for h in handles.values():
            ray.kill(h)
        if started:
            ray.shutdown()
        raise
    client = ClusterClient(
        info,
        scheduler,
        {w: (role_of[w], h) for w, h in handles.items()},
        metrics,
        block_size=config.engine.block_size,
        policy=config.routing.policy,
    )
    client.start()
    log.info("pdserve deployment up: %s", ", ".join(f"{n} {r}" for r, n in counts.items()))
    return Deployment(config, client, scheduler, handles, started)
