"""In-process KV transport: a synchronous block copy between caches that live in the same Python process.

The reference implementation and test oracle for the fast transports. Peers find each other through a
process-global registry (name -> transport), so it cannot cross processes or Ray actors.
"""

from __future__ import annotations

import itertools
import threading

import torch

from pdserve.kv.transport import KVTransferError, KVTransport, TransferState, check_block_ids, check_peer
from pdserve.protocol import KVLayout, PeerInfo

_lock = threading.Lock()
_registry: dict[str, LocalTransport] = {}


class LocalTransport(KVTransport):
    kind = "local"

    def __init__(self, name: str, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        super().__init__(name, kv_cache, layout)
        with _lock:
            if name in _registry:
                raise ValueError(f"a local KV transport named {name!r} already exists in this process")
            _registry[name] = self
        self._peers: dict[str, PeerInfo] = {}
        self._transfers: dict[int, tuple[TransferState, str | None]] = {}
        self._handles = itertools.count(1)
        self._closed = False

    def peer_info(self) -> PeerInfo:
        dev = self.kv_cache.device
        return PeerInfo(
            name=self.name,
            transport=self.kind,
            layout=self.layout,
            base_address=self.kv_cache.data_ptr(),
            device_id=dev.index or 0,
            memory="VRAM" if dev.type == "cuda" else "DRAM",
        )

    def add_peer(self, info: PeerInfo) -> None:
        check_peer(self.layout, self.kind, info)
        with _lock:
            peer = _registry.get(info.name)
        if peer is None or peer.kv_cache.data_ptr() != info.base_address:
            raise ValueError(f"peer {info.name!r} has no local KV transport in this process (local works in-process)")
        self._peers[info.name] = info

    def remove_peer(self, name: str) -> None:
        self._peers.pop(name, None)

    def start_pull(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], key: int = 0) -> int:
        if self._closed:
            raise KVTransferError(f"transport {self.name!r} is closed")
        info = self._peers.get(peer)
        if info is None:
            raise KVTransferError(f"unknown peer {peer!r}: call add_peer with its PeerInfo first")
        check_block_ids(src_block_ids, dst_block_ids, info.layout.num_blocks, self.layout.num_blocks)
        handle = next(self._handles)
        with _lock:
            source = _registry.get(peer)
        if source is None:
            self._transfers[handle] = (TransferState.FAILED, f"peer {peer!r} has closed its transport")
            return handle
        if src_block_ids:
            src = source.kv_cache
            rows = src.index_select(0, torch.tensor(src_block_ids, device=src.device))
            dst_idx = torch.tensor(dst_block_ids, device=self.kv_cache.device)
            self.kv_cache.index_copy_(0, dst_idx, rows.to(self.kv_cache.device))
        self._transfers[handle] = (TransferState.DONE, None)
        return handle

    def poll(self, handle: int) -> TransferState:
        return self._transfers[handle][0]

    def error(self, handle: int) -> str | None:
        record = self._transfers.get(handle)
        return record[1] if record else None

    def release(self, handle: int) -> None:
        self._transfers.pop(handle, None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transfers.clear()
        self._peers.clear()
        with _lock:
            if _registry.get(self.name) is self:
                del _registry[self.name]
