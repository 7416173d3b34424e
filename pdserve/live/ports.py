"""Free TCP ports on 127.0.0.1. A port found free may be taken before its user binds it; callers that can bind
port 0 themselves (`thread.ServerThread`) do that instead."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free (a deployment's frontend i listens on p + i)."""
    while True:
        port = free_port()
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
