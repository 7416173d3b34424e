"""Driver-side operations on a deployment living in the Ray cluster: deploy (start its controller, which
starts everything else), find it by name, and shut it down leaving no named actor behind."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import ray

from pdserve.config import NAMESPACE, ServeConfig, controller_actor_name
from pdserve.controller.actor import Controller

log = logging.getLogger(__name__)

WATCH_POLL_S = 300.0  # one long-poll of the controller's `wait_shutdown`
GONE_TIMEOUT_S = 120.0  # after a shutdown from elsewhere began, how long its actors may take to go


class DeploymentExists(ValueError):
    """A deployment of that name already runs in this Ray cluster."""


class NoDeployment(ValueError):
    """No deployment of that name runs in this Ray cluster."""


def init_ray(address: str | None, num_workers: int = 2) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local Ray; True if this process started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        return False
    cpus = max(os.cpu_count() or 1, num_workers + 2)  # logical CPUs: one per actor even on 2 cores
    ray.init(num_cpus=cpus, include_dashboard=False, namespace=NAMESPACE, log_to_driver=True)
    return True


def find_controller(name: str):
    try:
        return ray.get_actor(controller_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        raise NoDeployment(f"no pdserve deployment named {name!r} runs in this Ray cluster") from None


def deployment_actor_names(name: str) -> list[str]:
    """Every named actor of the deployment `name` that Ray still lists (none once it is shut down)."""
    prefix = f"{name}."
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
    )


@dataclass
class Deployment:
    config: ServeConfig
    controller: object
    started_ray: bool = False
    client: object = None  # a ClusterClient in this process, when asked for
    _closed: bool = field(default=False, repr=False)

    @property
    def handles(self) -> dict[str, object]:
        """worker id -> actor handle of the workers this process's client sees (live ones)."""
        return {w: h for w, (_, h) in self.client.workers.items()} if self.client is not None else {}

    async def status(self) -> dict:
        return await self.controller.status.remote()

    async def wait_gone(self) -> bool:
        """Return once the deployment ends without this process: True when another process shut it down
        (`pdserve shutdown`), after every named actor of it went (or GONE_TIMEOUT_S passed); False when its
        controller died otherwise. A controller that Ray restarts is not gone."""
        while True:
            try:
                if await self.controller.wait_shutdown.remote(WATCH_POLL_S):
                    break
            except ray.exceptions.ActorDiedError:
                return False
            except ray.exceptions.ActorUnavailableError:  # restarting, or a network blip
                await asyncio.sleep(1.0)
        deadline = asyncio.get_running_loop().time() + GONE_TIMEOUT_S
        while deployment_actor_names(self.config.name) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        return True

    async def shutdown(self) -> None:
        """Idempotent, and quiet when another process already shut the deployment down: stop the client,
        every worker and frontend, then the controller."""
        if self._closed:
            return
        self._closed = True
        if self.client is not None:
            await self.client.shutdown()
        await shutdown_deployment(self.controller, self.config.name)
        if self.started_ray:
            ray.shutdown()


async def deploy(
    config: ServeConfig, *, serve_http: bool = True, connect: bool = False, metrics=None, timeout_s: float = 600.0
) -> Deployment:
    """Start the deployment `config.name` (refused if one of that name runs) and wait until it is at its
    target size. `serve_http`: the controller runs the HTTP frontends; `connect`: also a client here."""
    started = init_ray(config.address, config.pools.total + config.frontend.frontends)
    try:
        find_controller(config.name)
    except NoDeployment:
        pass
    else:
        raise DeploymentExists(
            f"a pdserve deployment named {config.name!r} already runs in this Ray cluster; stop it with "
            f"'pdserve shutdown --name {config.name}' or deploy under another --name"
        )
    controller = Controller.options(
        name=controller_actor_name(config.name),
        namespace=NAMESPACE,
        lifetime="detached",
        max_restarts=config.controller.max_restarts,
        max_task_retries=-1,
        resources=dict(config.controller.resources),
    ).remote(config.model_dump(mode="json"), serve_http)
    dep = Deployment(config, controller, started)
    try:
        await controller.wait_ready.remote(timeout_s)
        if connect:
            from pdserve.cluster.client import connect_client

            dep.client = await connect_client(config, metrics)
    except BaseException:
        await dep.shutdown()
        raise
    return dep


async def shutdown_deployment(controller, name: str) -> None:
    try:
        await asyncio.wait_for(controller.shutdown.remote(), 60)
    except ray.exceptions.ActorDiedError:  # shut down already (or died): what is left is killed below by name
        log.info("controller of %s already gone; killing what is left of the deployment by name", name)
    except Exception as e:  # a hung or failing controller: its actors are still killed below by name
        log.warning("controller shutdown failed (%r); killing the deployment's actors by name", e)
    ray.kill(controller, no_restart=True)
    for actor_name in deployment_actor_names(name):
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
        except Exception:  # died meanwhile
            pass


async def build(config: ServeConfig, metrics=None) -> Deployment:
    """A deployment plus a client in this process and no HTTP frontends (tests and embedding)."""
    return await deploy(config, serve_http=False, connect=True, metrics=metrics)
