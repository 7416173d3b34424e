"""One KV handoff for every move: prefill -> decode, decode -> decode (live migration) and colocated ->
anything go through a `Sender` (hold under a lease, serve, release) and a `Receiver` (reserve, pull, finish),
each a table of per-transfer records; `Handoff` holds both for one worker; `Peer` is the other worker."""

from pdserve.handoff.handoff import Handoff
from pdserve.handoff.migration import Migrator
from pdserve.handoff.peer import Engine, LocalPeer, Peer
from pdserve.handoff.receiver import Receiver
from pdserve.handoff.sender import Sender

__all__ = ["Engine", "Handoff", "LocalPeer", "Migrator", "Peer", "Receiver", "Sender"]
