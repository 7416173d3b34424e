"""Collective KV transport: send/recv over a torch.distributed process group per pair of peers (Gloo on CPU
caches, NCCL on CUDA), formed lazily at the pair's first transfer. Ray's collective groups are declared over
a fixed actor list by the driver; pairs formed on demand let workers that join later take part.

A TCPStore client runs one call at a time on its socket, and `wait`/`get` hold it until the key appears. So
no blocking call shares a connection with the handshakes: each pair has its own client (not rank 0's master
object, which serves every pair), and each first arrival waits on a spare connection of the pair's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import count

import torch
import torch.distributed as dist

from pdserve.kv.transport import KVTransferError, KVTransport, TransferState, check_block_ids, check_peer
from pdserve.protocol import KVLayout, PeerInfo

_SENTINEL_TAG, _ABORT_TAG, _FIRST_TAG = 0, 1, 16  # data tags come from the pair's sequence, never a key
_LONG = timedelta(days=30)  # a Gloo wait that times out closes the pair, so waits on committed ops are long


@dataclass(eq=False)
class _Group:
    """One process group between us and a peer: rank 0 is the smaller name and hosts the store."""

    pg: object
    store: object  # the pair's store, prefixed with the generation: quick calls only, never a blocking wait
    peer_rank: int
    address: tuple[str, int, str]  # host, port and prefix of that store, to open more connections to it
    spare: list = field(default_factory=list)  # idle connections for handshake waits
    pending: set = field(default_factory=set)  # transfers past connect, to wake if the group dies
    dead: str | None = None
    watcher: threading.Thread | None = None
    turn: int = 1  # serialized mode: the sequence number whose data op runs next
    turns: threading.Condition = field(default_factory=threading.Condition)

    def kill(self, reason: str) -> None:
        with self.turns:
            self.dead = self.dead or reason
            self.turns.notify_all()


@dataclass(eq=False)
class _Peer:
    info: PeerInfo
    host: str
    port: int
    pair: str  # names and incarnations of both ends: a replaced peer gets a fresh namespace
    lock: threading.Lock = field(default_factory=threading.Lock)
    group: _Group | None = None
    client: object | None = None  # our connection to rank 0's store (the peer's or ours) for this pair
    removed: bool = False


@dataclass(eq=False)
class _Transfer:
    peer: _Peer
    src: list[int]
    dst: list[int] | None  # None: a serve
    base: str  # handshake keys in the group's store: "<receiver>/<key>"
    state: TransferState = TransferState.PENDING
    error: str | None = None
    released: bool = False
    group: _Group | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while writing into dst


class CollectiveTransport(KVTransport):
    """Two-sided: the receiver's `start_pull` and the sender's `start_serve` with the same key meet through a
    handshake in the pair's TCPStore (first arrival waits, second says "go", a cancel says "cancelled"), so a
    send or recv is posted only once both ends are committed and no Gloo wait is ever left orphaned.

    Options: `timeout_s` bounds the pair's rendezvous and a handshake's wait for the other end;
    `max_inflight` is the number of worker threads (each pending transfer holds one while it waits);
    `serialize` runs a pair's transfers one at a time in the order of their sequence numbers, which both ends
    share: on by default for NCCL, which ignores send/recv tags (concurrent ops would match in posting order).
    """

    kind = "nccl"
    two_sided = True

    def __init__(self, name: str, kv_cache, layout: KVLayout, *, timeout_s=10.0, max_inflight=8, serialize=None):
        super().__init__(name, kv_cache, layout)
        self._timeout = timedelta(seconds=timeout_s)
        self._cuda = kv_cache.device.type == "cuda"
        self._serialize = self._cuda if serialize is None else serialize
        self._blocks = kv_cache.view(layout.num_blocks, -1).view(torch.uint8)
        self._host = _node_ip()
        self._store = dist.TCPStore(self._host, 0, is_master=True, wait_for_workers=False, timeout=self._timeout)
        self._incarnation = os.urandom(6).hex()
        self._pool = ThreadPoolExecutor(max_inflight, thread_name_prefix=f"kv-{name}")
        self._control = ThreadPoolExecutor(1, thread_name_prefix=f"kv-{name}-cancel")
        self._peers: dict[str, _Peer] = {}
        self._transfers: dict[int, _Transfer] = {}
        self._handles = count(1)
        self._last_gen: dict[str, int] = {}  # pair -> last generation we joined; survives remove_peer
        self._closed = False

    def peer_info(self) -> PeerInfo:
        dev = self.kv_cache.device
        blob = {"host": self._host, "port": self._store.port, "incarnation": self._incarnation}
        return PeerInfo(
            name=self.name,
            transport=self.kind,
            layout=self.layout,
            base_address=self.kv_cache.data_ptr(),
            device_id=dev.index or 0,
            memory="VRAM" if dev.type == "cuda" else "DRAM",
            agent_metadata=json.dumps(blob).encode(),
        )

    def add_peer(self, info: PeerInfo) -> None:
        self._check_open()
        check_peer(self.layout, self.kind, info)
        if info.name == self.name:
            raise ValueError(f"{self.name!r} cannot add itself as a peer")
        known = self._peers.get(info.name)
        if known is not None:
            if known.info == info:
                return
            self.remove_peer(info.name)
        blob = json.loads(info.agent_metadata or b"{}")
        ends = sorted([(self.name, self._incarnation), (info.name, blob.get("incarnation", ""))])
        self._peers[info.name] = _Peer(info, blob.get("host", ""), blob.get("port", 0), "|".join(map(":".join, ends)))

    def remove_peer(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        peer.removed = True
        for t in self._transfers.values():
            if t.peer is peer:
                self._cancel(t, f"peer {name!r} was removed")
        self._drop_group(peer)
        peer.client = None

    def start_pull(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], key: int = 0) -> int:
        return self._start(peer, src_block_ids, dst_block_ids, key, receiver=self.name)

    def start_serve(self, peer: str, src_block_ids: list[int], key: int) -> int:
        return self._start(peer, src_block_ids, None, key, receiver=peer)

    def poll(self, handle: int) -> TransferState:
        return self._transfers[handle].state

    def error(self, handle: int) -> str | None:
        t = self._transfers.get(handle)
        return t.error if t else None

    def release(self, handle: int) -> None:
        t = self._transfers.pop(handle, None)
        if t is not None:
            self._cancel(t, "released")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in list(self._transfers):
            self.release(handle)
        for name in list(self._peers):
            self.remove_peer(name)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._control.shutdown(wait=True)
        self._store = None

    # ---- the transfer job, on a pool thread -------------------------------------------------------------
    def _start(self, peer: str, src: list[int], dst: list[int] | None, key: int, receiver: str) -> int:
        self._check_open()
        known = self._peers.get(peer)
        if known is None:
            raise KVTransferError(f"unknown peer {peer!r}: call add_peer with its PeerInfo first")
        if dst is None:
            check_block_ids(src, src, self.layout.num_blocks, self.layout.num_blocks)
        else:
            check_block_ids(src, dst, known.info.layout.num_blocks, self.layout.num_blocks)
        handle = next(self._handles)
        t = self._transfers[handle] = _Transfer(known, src, dst, f"{receiver}/{key}")
        if not src:
            t.state = TransferState.DONE
        else:
            self._pool.submit(self._run, t)
        return handle

    def _run(self, t: _Transfer) -> None:
        try:
            group = t.group = self._connect(t.peer)
            if t.dst is None:  # a serve: copy its blocks out before the handshake
                with t.lock:
                    payload = self._blocks.index_select(0, torch.tensor(t.src, device=self._blocks.device)).view(-1)
                self._sync()
            if t.released:
                return
            group.pending.add(t)
            seq = self._handshake(group, t)
            if seq is None:
                raise KVTransferError(group.dead or "cancelled by the other end or timed out waiting for it")
            tag = _FIRST_TAG + seq % (2**31 - _FIRST_TAG)
            with self._turn(group, seq):
                if t.dst is None:
                    group.pg.send([payload], group.peer_rank, tag).wait(_LONG)
                    self._sync()
                else:
                    self._recv(group, t, tag)
            with t.lock:
                if t.state is TransferState.PENDING:
                    t.state = TransferState.DONE
        except Exception as e:
            reason = t.group.dead if t.group is not None and t.group.dead else str(e) or type(e).__name__
            with t.lock:
                if t.state is TransferState.PENDING:
                    t.state, t.error = TransferState.FAILED, reason
        finally:
            if t.group is not None:
                t.group.pending.discard(t)

    def _recv(self, group: _Group, t: _Transfer, tag: int) -> None:
        staging = torch.empty((len(t.src), self.layout.block_bytes), dtype=torch.uint8, device=self._blocks.device)
        group.pg.recv([staging.view(-1)], group.peer_rank, tag).wait(_LONG)
        self._sync()
        for suffix in "nsq":
            group.store.delete_key(f"{t.base}/{suffix}")
        with t.lock:  # release() takes this lock, so dst is never written after it returns
            if not t.released:
                self._blocks.index_copy_(0, torch.tensor(t.dst, device=self._blocks.device), staging)
                self._sync()

    def _handshake(self, group: _Group, t: _Transfer) -> int | None:
        """The transfer's sequence number in the pair once both ends are committed; None if either cancelled.

        The first arrival waits (on a connection of its own) for the second to CAS "go", or for a cancel to
        CAS "cancelled". Only the winner of "go" takes a number and publishes it, so every number taken
        belongs to a transfer that both ends run, and the sequence has no holes.
        """
        store, n, s, q = group.store, f"{t.base}/n", f"{t.base}/s", f"{t.base}/q"
        if store.add(n, 1) > 1:
            if store.compare_set(s, "", "cancelled" if t.released else "go") != b"go":
                return None
            seq = store.add("seq", 1)
            store.set(q, str(seq))
            return seq
        try:
            conn = group.spare.pop()
        except IndexError:
            host, port, prefix = group.address
            conn = dist.PrefixStore(prefix, self._dial(host, port))
        try:
            try:
                conn.wait([s], self._timeout)
            except Exception:  # timed out: cancel below unless the other end said go meanwhile
                pass
            if store.compare_set(s, "", "cancelled") != b"go":
                return None
            return int(conn.get(q))  # the other end sets it right after its "go"
        finally:
            group.spare.append(conn)

    @contextmanager
    def _turn(self, group: _Group, seq: int):
        """Serialized mode: the pair's data ops run one at a time, in sequence order on both ends."""
        if not self._serialize:
            yield
            return
        with group.turns:
            group.turns.wait_for(lambda: group.turn == seq or group.dead)
            if group.dead:
                raise KVTransferError(group.dead)
        try:
            yield
        finally:
            with group.turns:
                group.turn = seq + 1
                group.turns.notify_all()

    def _connect(self, peer: _Peer) -> _Group:
        """The live group with `peer`, forming it (a rendezvous both ends join) at a generation neither used."""
        with peer.lock:
            if peer.group is not None and not peer.group.dead:
                return peer.group
            self._drop_group(peer)
            rank = 0 if self.name < peer.info.name else 1
            _probe(peer.host, peer.port, self._timeout.total_seconds())  # fail fast if the peer has gone
            host, port = (self._host, self._store.port) if rank == 0 else (peer.host, peer.port)
            if peer.client is None:
                peer.client = self._dial(host, port)
            store = peer.client
            gen = int(store.add(f"{peer.pair}/gen", 0))
            if gen <= self._last_gen.get(peer.pair, -1):
                gen = int(store.compare_set(f"{peer.pair}/gen", str(gen), str(gen + 1)))
            self._last_gen[peer.pair] = gen
            prefix = f"{peer.pair}/{gen}"
            prefixed = dist.PrefixStore(prefix, store)
            if self._cuda:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = _LONG
                pg = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
            else:
                pg = dist.ProcessGroupGloo(prefixed, rank, 2, self._timeout)
            group = peer.group = _Group(pg, prefixed, 1 - rank, (host, port, prefix))
            if not self._cuda:
                group.watcher = threading.Thread(target=self._watch, args=(group,), name=f"kv-{self.name}-watch")
                group.watcher.start()
            if peer.removed:  # remove_peer ran while we formed it: it may not have seen the group
                self._drop_group(peer)
                raise KVTransferError(f"peer {peer.info.name!r} was removed")
            return group

    def _watch(self, group: _Group) -> None:
        """A recv nobody answers: it fails as soon as the pair closes (peer gone, or `_drop_group` here)."""
        try:
            group.pg.recv([torch.zeros(1, dtype=torch.uint8)], group.peer_rank, _SENTINEL_TAG).wait(_LONG)
        except Exception as e:
            group.kill(f"connection to the peer lost: {str(e).splitlines()[-1][:200]}")
        for t in list(group.pending):
            self._wake(group, t)

    def _drop_group(self, peer: _Peer) -> None:
        group, peer.group = peer.group, None
        if group is None:
            return
        group.kill("the group was closed")
        if group.watcher is not None:
            try:  # a Gloo wait that times out closes the pair: the sentinel and any posted op fail at once
                group.pg.recv([torch.zeros(1, dtype=torch.uint8)], group.peer_rank, _ABORT_TAG).wait(
                    timedelta(milliseconds=1)
                )
            except Exception:
                pass
            group.watcher.join()

    def _cancel(self, t: _Transfer, reason: str) -> None:
        with t.lock:
            t.released = True
            pending = t.state is TransferState.PENDING
            if pending:
                t.state, t.error = TransferState.FAILED, reason
        if pending and t.group is not None:
            self._control.submit(self._wake, t.group, t)

    def _wake(self, group: _Group, t: _Transfer) -> None:
        """Unblock a transfer waiting in the handshake (its `compare_set` then reads "cancelled")."""
        try:
            group.store.compare_set(f"{t.base}/s", "", "cancelled")
        except Exception:  # the store went with the peer: the waiter's own store call fails too
            pass

    def _dial(self, host: str, port: int):
        return dist.TCPStore(host, port, is_master=False, timeout=self._timeout)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self._blocks.device).synchronize()

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"transport {self.name!r} is closed")


def _node_ip() -> str:
    """The node's IP when running under Ray (so peers on other nodes can reach the store), else loopback."""
    ray = sys.modules.get("ray")  # never imported here: kv/ does not depend on Ray
    try:
        return ray.util.get_node_ip_address() if ray is not None and ray.is_initialized() else "127.0.0.1"
    except Exception:
        return "127.0.0.1"


def _probe(host: str, port: int, timeout_s: float) -> None:
    """Raise at once if nothing listens at the peer's store: its process has gone."""
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 2.0)).close()
    except OSError as e:
        raise KVTransferError(f"peer store at {host}:{port} is unreachable ({e})") from e
