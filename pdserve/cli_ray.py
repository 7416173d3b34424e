"""How a CLI process joins a Ray cluster: token auth decided before Ray is imported, the cluster's address
resolved and probed so a missing or silent cluster fails in seconds, and the deployment's controller found.
Every failure here is a ValueError of one line (the CLI prints it and exits 2)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile

PROBE_TIMEOUT_S = 3.0
JOIN_TIMEOUT_S = "5"  # seconds: Ray's own budget for reaching the GCS (RAY_gcs_server_port_wait_time_s; 20 s)


def use_ray_token_auth() -> None:
    """Set RAY_AUTH_MODE=token when it is unset and this user has a Ray token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). Ray 2.60 clusters require the token whenever one existed
    when they started (`ray start --head`; a local `ray.init()` always makes one), but its client turns token
    auth on by itself only for a cluster it finds on its own (`address="auto"`), never for a given address.
    Effective only before the process first imports Ray: Ray reads the setting once, at import."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or (os.path.isfile(path) and os.path.getsize(path) > 0):
        os.environ["RAY_AUTH_MODE"] = "token"


def resolve_address(address: str | None) -> str:
    """host:port of the GCS to join: `address`, else RAY_ADDRESS, else the cluster `ray start` left on this
    machine, else the only one running here (several: refused, pick one with --address)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die  # how `ray status` finds it

    try:  # None, not "auto": for "auto" Ray picks any of several clusters running here
        return canonicalize_bootstrap_address_or_die(None if address in (None, "auto") else address)
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster to join: {e}") from None


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse an address nothing answers at; Ray itself retries such an address for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ValueError(f"no Ray cluster answers at {address} ({getattr(e, 'strerror', None) or e})") from None


def connect(address: str | None, name: str):
    """Join the cluster (as a driver that prints none of Ray's logs) and return the controller of the
    deployment `name`; ValueError if there is no cluster, it does not answer, or no such deployment runs."""
    import ray

    from pdserve.config import NAMESPACE
    from pdserve.controller.deploy import find_controller

    gcs = resolve_address(address)
    probe(gcs)
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", JOIN_TIMEOUT_S)  # read by ray.init, not at import
    with tempfile.TemporaryFile("w+") as log:
        try:
            with _stderr_to(log):  # Ray's C++ client logs each failed try (once a second) to fd 2
                ray.init(address=gcs, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as e:
            log.seek(0)
            tried = [line for line in log.read().splitlines() if line.strip()]
            why = _C_LOG_PREFIX.sub("", tried[-1]) if tried else str(e).splitlines()[0]
            raise ValueError(f"could not join the Ray cluster at {gcs}: {why}") from None
    return find_controller(name)


_C_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")  # "[2026-01-01 00:00:00,000 W 1 1] file.cc:210: "


@contextlib.contextmanager
def _stderr_to(file):
    """File descriptor 2 (where C++ writes) goes to `file` inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def call(ref, timeout_s: float | None):
    """`ray.get(ref)`; a KeyError or ValueError the controller raised comes back as a one-line ValueError."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (KeyError, ValueError)):
            raise ValueError(str(cause.args[0] if cause.args else cause)) from None
        raise
