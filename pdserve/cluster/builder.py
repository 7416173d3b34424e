"""Build a deployment from one validated `ServeConfig`: Ray, worker actors, peer wiring, the scheduler.

Peers exchange transport metadata here, at start-up, so the first request pays no connection set-up.
`Deployment.shutdown()` is idempotent and stops only what this deployment started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from dataclasses import dataclass, field

import ray

from pdserve.cluster.client import ClusterClient
from pdserve.config import EngineConfig
from pdserve.model_info import load_model_info
from pdserve.scheduler.policies import POLICIES
from pdserve.workers.worker import WorkerOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated_workers: int = 0
    transport: str = "nixl"
    routing: str = "prefix_aware"
    routing_temperature: float = 0.0  # prefix_aware: softmax temperature over costs (0: argmin)
    local_prefill_max_tokens: int = 64  # prefill on the decode worker when it lacks at most this many tokens
    address: str | None = None  # None: start a local Ray; "auto" or ray://...: join a cluster
    lease_s: float = 10.0
    max_waiting_per_worker: int = 64
    worker_cpus: float | None = None  # Ray CPUs per worker actor (default: 1 on a cluster, spread locally)

    def __post_init__(self) -> None:
        for name in ("prefill_workers", "decode_workers", "colocated_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.decode_workers + self.colocated_workers == 0:
            raise ValueError("need at least one decode worker or colocated worker")
        if self.prefill_workers and not self.decode_workers:
            raise ValueError("prefill workers need at least one decode worker to hand off to")
        if self.transport not in ("nixl", "local"):
            raise ValueError(f"transport must be 'nixl' or 'local', got {self.transport!r}")
        if self.transport == "local" and self.prefill_workers:
            raise ValueError("transport 'local' moves KV only inside one process; use 'nixl' between workers")
        if self.routing not in POLICIES:
            raise ValueError(f"routing must be one of {sorted(POLICIES)}, got {self.routing!r}")
        if self.lease_s <= 1:
            raise ValueError("lease_s must be more than 1 second")

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers + self.colocated_workers


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


def router_config(config: ServeConfig):
    from pdserve.scheduler.policies import DisaggConfig
    from pdserve.scheduler.router import RouterConfig

    options = {"temperature": config.routing_temperature} if config.routing == "prefix_aware" else {}
    return RouterConfig(
        policy=config.routing,
        policy_options=options,
        block_size=config.engine.block_size,
        max_waiting_per_worker=config.max_waiting_per_worker,
        disagg=DisaggConfig(local_prefill_max_tokens=config.local_prefill_max_tokens),
    )


def _init_ray(config: ServeConfig) -> bool:
    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="pdserve", log_to_driver=True)
        return False
    cpus = max(os.cpu_count() or 1, config.num_workers + 1)  # logical CPUs: one per actor even on 2 cores
    ray.init(num_cpus=cpus, include_dashboard=False, namespace="pdserve", log_to_driver=True)
    return True


def _worker_resources(config: ServeConfig) -> dict:
    if config.engine.device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": config.worker_cpus or 1}
    # CPU KV caches on transparent huge pages: NIXL's same-host READ (CMA) moves them ~1.5-2x faster
    # (bench/kv_transfer.py: 10.2 -> 15.8 GB/s scattered at 256 MB)
    return {
        "num_cpus": config.worker_cpus if config.worker_cpus is not None else 1,
        "runtime_env": {"env_vars": {"THP_MEM_ALLOC_ENABLE": "1"}},
    }


async def build(config: ServeConfig, metrics=None) -> Deployment:
    from pdserve.scheduler.router import GlobalScheduler
    from pdserve.workers.actors import ACTOR_CLASSES

    started = _init_ray(config)
    info = load_model_info(config.engine.model, config.engine.max_model_len)
    threads = max(1, (os.cpu_count() or 1) // config.num_workers) if not config.address else None
    options = WorkerOptions(transport=config.transport, lease_s=config.lease_s, torch_threads=threads)
    tag = uuid.uuid4().hex[:6]
    roles = ["prefill"] * config.prefill_workers + ["decode"] * config.decode_workers
    roles += ["colocated"] * config.colocated_workers
    handles, role_of = {}, {}
    counts: dict[str, int] = {}
    for role in roles:
        worker_id = f"{role}-{counts.setdefault(role, 0)}-{tag}"
        counts[role] += 1
        engine = config.engine
        if engine.device.startswith("cuda"):
            engine = dataclasses.replace(engine, device="cuda")  # Ray gives each actor its own GPU as cuda:0
        handles[worker_id] = (
            ACTOR_CLASSES[role]
            .options(name=f"pdserve-{worker_id}", **_worker_resources(config))
            .remote(worker_id, engine, options)
        )
        role_of[worker_id] = role
    try:
        infos = await asyncio.gather(*(h.start.remote() for h in handles.values()))
        await asyncio.gather(*(h.add_peers.remote(list(infos)) for h in handles.values()))
        scheduler = GlobalScheduler.options(name=f"pdserve-scheduler-{tag}").remote(router_config(config))
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
        policy=config.routing,
    )
    client.start()
    log.info("pdserve deployment up: %s", ", ".join(f"{n} {r}" for r, n in counts.items()))
    return Deployment(config, client, scheduler, handles, started)
