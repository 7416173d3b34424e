"""One KV handoff for every move: prefill -> decode, decode -> decode (live migration) and colocated ->
anything go through a `Sender` (hold under a lease, serve, free) and a `Receiver` (reserve, pull, finish)."""

from pdserve.handoff.migration import Migrator
from pdserve.handoff.receiver import Receiver
from pdserve.handoff.sender import Sender

__all__ = ["Migrator", "Receiver", "Sender"]
