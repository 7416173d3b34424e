"""Creating one worker actor: its Ray options (resources per role, GPU or CPU, threads) and its arguments."""

from __future__ import annotations

import os

from pdserve.config import NAMESPACE, ServeConfig, worker_actor_name


def resources(config: ServeConfig, role: str) -> dict:
    cpus = config.worker.cpus if config.worker.cpus is not None else 1
    opts: dict = {"num_cpus": cpus}
    if role in config.pools.resources:
        opts["resources"] = dict(config.pools.resources[role])
    if config.engine.device.startswith("cuda"):
        opts["num_gpus"] = 1
    else:
        # CPU KV caches on transparent huge pages: NIXL's same-host READ (CMA) moves them ~1.5-2x faster
        opts["runtime_env"] = {"env_vars": {"THP_MEM_ALLOC_ENABLE": "1"}}
    return opts


def create_worker(config: ServeConfig, worker_id: str, role: str):
    """A detached, named worker actor of `role` (its creation may wait for resources); returns its handle."""
    from pdserve.workers.actors import ACTOR_CLASSES

    engine = config.engine.replace(device="cuda") if config.engine.device.startswith("cuda") else config.engine
    options = config.worker
    if options.torch_threads is None and not config.address:  # one machine: share its cores
        options = options.replace(torch_threads=max(1, (os.cpu_count() or 1) // max(1, config.pools.total)))
    return (
        ACTOR_CLASSES[role]
        .options(
            name=worker_actor_name(config.name, worker_id),
            namespace=NAMESPACE,
            lifetime="detached",
            **resources(config, role),
        )
        .remote(worker_id, engine, options, config.kv, config.migration, config.routing.max_waiting_per_worker)
    )
