"""NIXL KV transport (UCX backend): the receiver READs the sender's registered blocks, one descriptor per block.

The cache is registered once; the local per-block descriptor list is prepared once and each peer's once in
`add_peer`, so a transfer only picks indices (NIXL merges runs of consecutive blocks into one descriptor).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from itertools import count

from pdserve.config import NixlConfig
from pdserve.kv.transport import KVTransferError, KVTransport, TransferState, check_block_ids, check_peer
from pdserve.protocol import KVLayout, PeerInfo

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Peer:
    info: PeerInfo
    blocks: object  # prepped remote descriptor list, one entry per peer block


@dataclass(eq=False)
class _Pull:
    peer: str
    xfers: list = field(default_factory=list)  # one NIXL transfer per chunk, set by the thread that posts it
    posts: list[Future] = field(default_factory=list)  # pool posts of those transfers; empty when posted inline
    done: set[int] = field(default_factory=set)  # chunks known to be DONE
    state: TransferState = TransferState.PENDING
    error: str | None = None


class NixlTransport(KVTransport):
    """NIXL over UCX between workers; DRAM for CPU caches, VRAM for CUDA caches.

    Options: the keys of the config's `kv.nixl` section (`pdserve.config.NixlConfig`, which holds their
    defaults and refuses unknown keys and bad values):
    - `num_threads`: a pull of at least `split_bytes` is split into this many chunks, each made and posted
      on its own thread of a pool (and UCX worker). A DRAM READ over CMA copies inside the post, so posting
      off the caller's thread keeps `start_pull` non-blocking and the chunks copy in parallel. Smaller pulls
      are posted inline: their copy is shorter than a thread hand-off.
    - `progress_thread`: NIXL's UCX progress thread. Off by default: the thread polls without sleeping (a
      whole core per agent), and without it a READ over CMA needs no action from the sender (a dead sender
      still fails the pull at once). Turn it on where connection set-up needs the sender to make progress
      (cross-node RDMA or TCP; not testable on this host).
    - `ucx_error_handling_mode`: "peer" (UCX detects a dead peer and fails its transfers; only transports
      that support it are used; needs the progress thread: without it a pull waits on the sender and times
      out, measured here) or "none".
    - `ucx_devices`: the UCX backend's device list (empty: all).
    """

    kind = "nixl"

    def __init__(self, name: str, kv_cache, layout: KVLayout, **options) -> None:
        super().__init__(name, kv_cache, layout)
        opts = NixlConfig(**options)
        num_threads = opts.num_threads
        api = _import_nixl()
        config = api.nixl_agent_config(
            enable_prog_thread=opts.progress_thread,
            backends=[],
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW,  # pool threads post while the loop polls
        )
        self._agent = api.nixl_agent(name, config)
        params = {"ucx_error_handling_mode": opts.ucx_error_handling_mode, "num_workers": str(num_threads)}
        if opts.ucx_devices:
            params["ucx_devices"] = opts.ucx_devices
        self._agent.create_backend("UCX", params)
        dev = kv_cache.device
        self._memory = "VRAM" if dev.type == "cuda" else "DRAM"
        self._device_id = dev.index or 0
        self._registered = self._agent.register_memory(kv_cache)
        self._local = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", _block_descs(kv_cache.data_ptr(), layout, self._device_id), self._memory
        )
        self._num_threads, self._split_bytes = num_threads, opts.split_bytes
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix=f"nixl-{name}")
        self._peers: dict[str, _Peer] = {}
        self._pulls: dict[int, _Pull] = {}
        self._handles = count(1)
        self._unreleased: list = []  # transfers NIXL could not release (still active); retried at close
        self._closed = False

    def peer_info(self) -> PeerInfo:
        return PeerInfo(
            name=self.name,
            transport=self.kind,
            layout=self.layout,
            base_address=self.kv_cache.data_ptr(),
            device_id=self._device_id,
            memory=self._memory,
            agent_metadata=self._agent.get_agent_metadata(),
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
        loaded = self._agent.add_remote_agent(info.agent_metadata)
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != info.name:
            self._agent.remove_remote_agent(loaded)
            raise ValueError(f"peer {info.name!r} published NIXL metadata for agent {loaded!r}")
        blocks = self._agent.prep_xfer_dlist(
            info.name, _block_descs(info.base_address, info.layout, info.device_id), info.memory
        )
        self._peers[info.name] = _Peer(info, blocks)

    def remove_peer(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        for pull in self._pulls.values():
            if pull.peer == name:
                self._drop(pull)
                if pull.state is TransferState.PENDING:
                    pull.state, pull.error = TransferState.FAILED, f"peer {name!r} was removed"
        self._agent.release_dlist_handle(peer.blocks)
        self._agent.remove_remote_agent(name)

    def start_pull(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], key: int = 0) -> int:
        self._check_open()
        known = self._peers.get(peer)
        if known is None:
            raise KVTransferError(f"unknown peer {peer!r}: call add_peer with its PeerInfo first")
        check_block_ids(src_block_ids, dst_block_ids, known.info.layout.num_blocks, self.layout.num_blocks)
        handle = next(self._handles)
        pull = self._pulls[handle] = _Pull(peer)
        if not src_block_ids:
            pull.state = TransferState.DONE
            return handle
        big = len(src_block_ids) * self.layout.block_bytes >= self._split_bytes
        chunks = _bounds(len(src_block_ids), min(self._num_threads, len(src_block_ids)) if big else 1)
        pull.xfers = [None] * len(chunks)
        parts = [(pull, i, known, src_block_ids[lo:hi], dst_block_ids[lo:hi]) for i, (lo, hi) in enumerate(chunks)]
        if big:
            pull.posts = [self._pool.submit(self._post, *part) for part in parts]
            return handle
        try:
            status = self._post(*parts[0])
        except Exception as e:  # NIXL raises e.g. nixlRemoteDisconnectError when the peer has gone
            self._fail(pull, e)
            return handle
        if status == "DONE":  # small DRAM reads usually complete inside the post
            pull.done.add(0)
        elif status == "ERR":
            self._fail(pull, "NIXL could not post the transfer")
        return handle

    def poll(self, handle: int) -> TransferState:
        pull = self._pulls[handle]
        if pull.state is not TransferState.PENDING:
            return pull.state
        pending = False
        for i in range(len(pull.xfers)):
            if i in pull.done:
                continue
            if pull.posts:
                post = pull.posts[i]
                if not post.done():
                    pending = True
                    continue
                if post.exception() is not None or post.result() == "ERR":
                    return self._fail(pull, post.exception() or "NIXL could not post the transfer")
                if post.result() == "DONE":
                    pull.done.add(i)
                    continue
            try:
                status = self._agent.check_xfer_state(pull.xfers[i])
            except Exception as e:
                return self._fail(pull, e)
            if status == "ERR":
                return self._fail(pull, "NIXL reported a transfer error")
            if status == "DONE":
                pull.done.add(i)
            else:
                pending = True
        if not pending:
            pull.state = TransferState.DONE
        return pull.state

    def error(self, handle: int) -> str | None:
        pull = self._pulls.get(handle)
        return pull.error if pull else None

    def release(self, handle: int) -> None:
        pull = self._pulls.pop(handle, None)
        if pull is not None:
            self._drop(pull)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in list(self._pulls):
            self.release(handle)
        for name in list(self._peers):
            _best_effort(self.remove_peer, name)
        self._pool.shutdown(wait=True)
        for xfer in self._unreleased:
            _best_effort(self._agent.release_xfer_handle, xfer)
        _best_effort(self._agent.release_dlist_handle, self._local)
        _best_effort(self._agent.deregister_memory, self._registered)
        self._unreleased.clear()

    def _post(self, pull: _Pull, i: int, peer: _Peer, src: list[int], dst: list[int]) -> str:
        """Make and post one chunk's READ on the calling thread. Making every chunk on one thread and posting
        from several measured slower than one thread: NIXL seems to bind a transfer to its maker's UCX worker."""
        pull.xfers[i] = self._agent.make_prepped_xfer("READ", self._local, dst, peer.blocks, src)
        return self._agent.transfer(pull.xfers[i])

    def _drop(self, pull: _Pull) -> None:
        """Wait for the posts still copying, then release (and so cancel) the pull's NIXL transfers."""
        wait_futures(pull.posts)
        for xfer in filter(None, pull.xfers):
            try:
                self._agent.release_xfer_handle(xfer)
            except Exception as e:
                log.warning("NIXL could not release a transfer from %r (still active?): %s", pull.peer, e)
                self._unreleased.append(xfer)
        pull.xfers, pull.posts = [], []

    def _fail(self, pull: _Pull, reason) -> TransferState:
        pull.state, pull.error = TransferState.FAILED, str(reason) or type(reason).__name__
        return pull.state

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"transport {self.name!r} is closed")


def _import_nixl():
    try:
        import nixl._api as api
    except ImportError as e:
        raise ImportError(
            "the 'nixl' KV transport needs the nixl package (pip install nixl); "
            "use the 'local' transport for engines in one process"
        ) from e
    if "NIXL_LOG_LEVEL" not in os.environ:  # NIXL logs every agent and backend creation at INFO to stdout
        logging.getLogger("nixl").setLevel(logging.WARNING)
    return api


def _block_descs(base: int, layout: KVLayout, device_id: int):
    """(address, length, device) per block of a block-major cache, as the Nx3 array NIXL takes."""
    import numpy as np

    descs = np.empty((layout.num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = base + np.arange(layout.num_blocks, dtype=np.uint64) * layout.block_bytes
    descs[:, 1] = layout.block_bytes
    descs[:, 2] = device_id
    return descs


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    step, extra = divmod(n, parts)
    edges = [i * step + min(i, extra) for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def _best_effort(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        log.warning("NIXL cleanup step %s failed: %s", getattr(fn, "__name__", fn), e)
