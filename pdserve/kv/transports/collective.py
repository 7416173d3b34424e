"""Collective KV transport: send/recv over a torch.distributed process group per pair of peers (Gloo on CPU
caches, NCCL on CUDA), formed lazily at the pair's first transfer. Ray's collective groups are declared over
a fixed actor list by the driver; pairs formed on demand let workers that join later take part.

A TCPStore client runs one call at a time on its socket, and `wait`/`get` hold it until the key appears. So
no blocking call shares a connection with the handshakes: each pair has its own client (not rank 0's master
object, which serves every pair), and each first arrival waits on a spare connection of the pair's.

Liveness: a watcher thread per pair holds a recv on a Gloo group that nobody answers; it fails as soon as the
pair's sockets close (the peer's process died, or either end closed the group), and then the group is killed,
its data group aborted and its pending transfers woken. On CPU the watch group is the data group; on NCCL it is
a second Gloo group on the pair's store (prefix "<generation>/watch"), since NCCL has no such signal.
Bounds: the rendezvous and a handshake's wait take at most `timeout_s`, a posted send or recv at most
`op_timeout_s` (`timeout_s` + its bytes at `min_bandwidth_bps`); an op past its bound fails its transfer and
closes the pair, as does any committed transfer that fails on one end, so the other end never waits it out.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
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
_LONG = timedelta(days=30)  # the watcher's sentinel only: a Gloo wait that times out closes the pair
_POLL_FIRST_S, _POLL_MAX_S = 50e-6, 1e-3  # a polled NCCL op's backoff


def op_timeout_s(nbytes: int, timeout_s: float, min_bandwidth_bps: float) -> float:
    """How long a posted send or recv of `nbytes` may take: the handshake's slack plus the bytes at the floor
    bandwidth. Both ends are committed before either posts, so only a dead, stuck or starved pair exceeds it."""
    return timeout_s + nbytes / min_bandwidth_bps


class _OpTimeout(KVTransferError):
    """A posted send or recv ran past `op_timeout_s`."""


@dataclass(eq=False)
class _Group:
    """One process group between us and a peer: rank 0 is the smaller name and hosts the store."""

    pg: object  # the data group: Gloo or NCCL
    watch: object  # the Gloo group the watcher listens on: `pg` itself, or a second group beside an NCCL one
    peer: str
    store: object  # the pair's store, prefixed with the generation: quick calls only, never a blocking wait
    peer_rank: int
    address: tuple[str, int, str]  # host, port and prefix of that store, to open more connections to it
    spare: list = field(default_factory=list)  # idle connections for handshake waits
    pending: set = field(default_factory=set)  # transfers past connect, to wake if the group dies
    dead: str | None = None
    closed: bool = False  # `_close` has ended everything posted on both groups
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

    Options: `timeout_s` bounds the pair's rendezvous, every store call and a handshake's wait for the other end;
    `min_bandwidth_bps` (bytes/s, default 100 MB/s) is the floor below which a posted send or recv counts as
    stuck: it fails after `op_timeout_s` = `timeout_s` + bytes / `min_bandwidth_bps`, and the pair is closed
    (a timed-out pair is never reused; the next transfer forms a fresh group). NCCL's own watchdog, which by
    default takes the process down when it fires, gets twice that bound for a transfer of the whole cache, so
    ours always fires first. `max_inflight` is the number of worker threads (each pending transfer holds one
    while it waits); `serialize` runs a pair's transfers one at a time in the order of their sequence numbers,
    which both ends share: on by default for NCCL, which ignores send/recv tags (concurrent ops would match in
    posting order). `_separate_watch_group` (private; always on for NCCL, off by default on CPU) gives the watcher
    a Gloo group of its own, as NCCL needs, so that CPU tests run the NCCL path's structure; both ends must agree
    (on NCCL they do: peers' layouts must name the same device type).
    """

    kind = "nccl"
    two_sided = True

    def __init__(
        self,
        name: str,
        kv_cache,
        layout: KVLayout,
        *,
        timeout_s=10.0,
        min_bandwidth_bps=100e6,
        max_inflight=8,
        serialize=None,
        _separate_watch_group=False,
    ):
        if not (timeout_s > 0 and min_bandwidth_bps > 0):
            raise ValueError(f"timeout_s and min_bandwidth_bps must be > 0, got {timeout_s}, {min_bandwidth_bps}")
        super().__init__(name, kv_cache, layout)
        self._timeout = timedelta(seconds=timeout_s)
        self._min_bandwidth = min_bandwidth_bps
        self._cuda = kv_cache.device.type == "cuda"
        self._serialize = self._cuda if serialize is None else serialize
        self._separate_watch = self._cuda or bool(_separate_watch_group)
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
        group = seq = None
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
                    work = group.pg.send([payload], group.peer_rank, tag)
                    self._wait_op(group, work, payload.numel(), "send of {} bytes to")
                    self._sync()
                else:
                    self._recv(group, t, tag)
            with t.lock:
                if t.state is TransferState.PENDING:
                    t.state = TransferState.DONE
        except Exception as e:
            if isinstance(e, _OpTimeout) or group is None or not group.dead:
                reason = str(e) or type(e).__name__
            else:
                reason = group.dead
            if seq is not None:  # committed on both ends: close the pair, so the other end fails now, not at its bound
                self._close(group, reason)
            with t.lock:
                if t.state is TransferState.PENDING:
                    t.state, t.error = TransferState.FAILED, reason
        finally:
            if t.group is not None:
                t.group.pending.discard(t)

    def _recv(self, group: _Group, t: _Transfer, tag: int) -> None:
        staging = torch.empty((len(t.src), self.layout.block_bytes), dtype=torch.uint8, device=self._blocks.device)
        work = group.pg.recv([staging.view(-1)], group.peer_rank, tag)
        self._wait_op(group, work, staging.numel(), "recv of {} bytes from")
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

    def _wait_op(self, group: _Group, work, nbytes: int, what: str) -> None:
        bound = op_timeout_s(nbytes, self._timeout.total_seconds(), self._min_bandwidth)
        _wait_op(group, work, bound, f"{what.format(nbytes)} peer {group.peer!r}", poll=self._cuda)

    @contextmanager
    def _turn(self, group: _Group, seq: int):
        """Serialized mode: the pair's data ops run one at a time, in sequence order on both ends.

        The wait is bounded: the op holding the turn is, and a committed transfer that fails closes the group.
        """
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
            watch = None
            if self._separate_watch:  # formed first on both ends: each Gloo rendezvous waits for the other end
                watch = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/watch", store), rank, 2, self._timeout)
            try:
                pg = self._data_group(prefixed, rank)
            except Exception:
                if watch is not None:
                    _close_pair(watch, 1 - rank)
                raise
            group = _Group(pg, watch or pg, peer.info.name, prefixed, 1 - rank, (host, port, prefix))
            group.watcher = threading.Thread(target=self._watch, args=(group,), name=f"kv-{self.name}-watch")
            group.watcher.start()
            peer.group = group  # after the watcher is set: `_drop_group` (from remove_peer, unlocked) joins it
            if peer.removed:  # remove_peer ran while we formed it: it may not have seen the group
                self._drop_group(peer)
                raise KVTransferError(f"peer {peer.info.name!r} was removed")
            return group

    def _data_group(self, store, rank: int):
        if not self._cuda:
            return dist.ProcessGroupGloo(store, rank, 2, self._timeout)
        options = dist.ProcessGroupNCCL.Options()
        # NCCL's watchdog, which by default takes the process down when it fires: a backstop that must never
        # beat `_wait_op`'s bound, so twice the bound of a transfer of the whole cache.
        whole = op_timeout_s(self._blocks.numel(), self._timeout.total_seconds(), self._min_bandwidth)
        options._timeout = timedelta(seconds=2 * whole)
        return dist.ProcessGroupNCCL(store, rank, 2, options)

    def _watch(self, group: _Group) -> None:
        """A recv nobody answers on the watch group: it fails as soon as that pair closes (the peer's process
        died, or either end's `_close`). Its wait is long on purpose: it is the pair's liveness signal however
        long the pair stays idle, and `_close` ends it."""
        try:
            group.watch.recv([torch.zeros(1, dtype=torch.uint8)], group.peer_rank, _SENTINEL_TAG).wait(_LONG)
            reason = f"peer {group.peer!r} broke the watch protocol"  # nobody sends on the sentinel's tag
        except Exception as e:
            reason = f"connection to peer {group.peer!r} lost: {_last_line(e)}"
        self._close(group, reason)
        for t in list(group.pending):
            self._wake(group, t)

    def _close(self, group: _Group, reason: str) -> None:
        """Kill the group and end everything posted on it, the watcher's sentinel included; idempotent. The kill
        comes first, so an op that an abort ends as if completed is still seen to have failed."""
        group.kill(reason)
        with group.turns:
            if group.closed:
                return
            group.closed = True
        if group.pg is not group.watch:
            self._abort(group)
        _close_pair(group.watch, group.peer_rank)

    def _abort(self, group: _Group) -> None:
        """End every op posted on a data group: NCCL's `abort` (torch >= 2.5) makes its kernels return; Gloo's
        `abort` does nothing, but a wait that times out closes the pair."""
        if not self._cuda:
            _close_pair(group.pg, group.peer_rank)
            return
        abort = getattr(group.pg, "abort", None)
        try:
            if abort is not None:
                abort()
        except Exception:  # already aborted, or the communicator was never created
            pass

    def _drop_group(self, peer: _Peer) -> None:
        group, peer.group = peer.group, None
        if group is None:
            return
        self._close(group, "the group was closed")
        if group.watcher is not None:
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


def _wait_op(group: _Group, work, bound_s: float, what: str, poll: bool) -> None:
    """Wait for a posted send or recv until it completes, the group dies or `bound_s` passes.

    Gloo's `wait` takes the bound itself and fails at once when the pair closes (every kill goes through
    `_close`, which closes it). NCCL's `wait` honours a timeout only from torch 2.6, so with `poll` the host polls
    `is_completed` (a CUDA event query) and watches the group; an abort ends a posted NCCL op as if it had
    completed, hence the check after the loop (the kill comes before the abort).
    """
    deadline = time.monotonic() + bound_s
    delay = _POLL_FIRST_S
    while poll and not work.is_completed():
        if group.dead:
            raise KVTransferError(group.dead)
        if time.monotonic() >= deadline:
            raise _OpTimeout(f"{what} timed out after {bound_s:.3g} s")
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)
    if poll and group.dead:
        raise KVTransferError(group.dead)
    try:
        work.wait(timedelta(seconds=bound_s))  # polled: done already; it orders the current stream after the op
    except Exception as e:
        if time.monotonic() >= deadline - 0.01:  # Gloo timed it out (its clock, rounded to milliseconds)
            raise _OpTimeout(f"{what} timed out after {bound_s:.3g} s") from e
        raise KVTransferError(f"{what} failed: {_last_line(e)}") from e


def _last_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]


def _close_pair(pg, peer_rank: int) -> None:
    """Close a Gloo group's pair: a wait that times out does, so the sentinel and any posted op fail at once."""
    try:
        pg.recv([torch.zeros(1, dtype=torch.uint8)], peer_rank, _ABORT_TAG).wait(timedelta(milliseconds=1))
    except Exception:
        pass


def _probe(host: str, port: int, timeout_s: float) -> None:
    """Raise at once if nothing listens at the peer's store: its process has gone."""
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 2.0)).close()
    except OSError as e:
        raise KVTransferError(f"peer store at {host}:{port} is unreachable ({e})") from e
