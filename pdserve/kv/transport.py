"""The KV transport seam: how one engine's paged KV blocks reach another's, and the registry of transports.

Implementations live in `pdserve.kv.transports`; each imports its library only when chosen.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pdserve.protocol import KVLayout, PeerInfo

if TYPE_CHECKING:
    import torch

    from pdserve.config import KVConfig

_POLL_FIRST_S = 50e-6
_POLL_MAX_S = 2e-3


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class KVTransferError(RuntimeError):
    """A pull could not complete: unknown peer, peer gone, transport error or timeout."""


class KVTransport(ABC):
    """Moves whole KV blocks from a peer engine's cache into this engine's cache.

    Who calls: the worker that owns the engine. It constructs one transport at start-up with the engine's
    `kv_cache` (block-major `[num_blocks, ...]`, contiguous, so block i is the byte range
    `[data_ptr + i * block_bytes, + block_bytes)`) and its `layout`; construction registers the whole cache
    once. Every method is called from the worker's event-loop thread; a transport is not thread-safe.

    Wiring: the worker publishes `peer_info()` through Ray and calls `add_peer(info)` with each peer's
    record (idempotent) before it pulls from that peer; `remove_peer(name)` when the peer leaves.

    Receiver side, a non-blocking state machine: `start_pull` returns a handle at once, `poll(handle)` never
    blocks and moves PENDING -> DONE | FAILED, `release(handle)` frees the transport's resources for it.
    `pull()` is the async convenience that does all three with a short backoff and a timeout.

    Sender side: a one-sided transport (`two_sided = False`: NIXL READs, the local copy) needs nothing from
    the sender. A two-sided one (`two_sided = True`: collective send/recv) needs the sender to call
    `start_serve(peer, src_block_ids, key)` for each pull, with the same block ids and the `key` the receiver
    passed to `start_pull`; the two calls may come in either order. The key (a 31-bit int the receiver
    picks, unique among its transfers in flight) is how the two halves find each other. A serve handle is
    polled and released like a pull handle. One-sided transports return None from `start_serve`.

    Block ownership: the sender's worker keeps `src_block_ids` allocated and unchanged (under a lease) until
    the receiver confirms; the transport never frees or writes a sender's block and the sender needs no
    per-transfer action. The receiver's `dst_block_ids` belong to the transfer from `start_pull` until
    `release` returns: on DONE they hold the sender's bytes; on FAILED or an early release their contents
    are undefined, but once `release` has returned the transport no longer writes into them, so the
    worker may free or reuse them.
    """

    kind: str = ""

    def __init__(self, name: str, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        check_cache(kv_cache, layout)
        self.name = name
        self.kv_cache = kv_cache
        self.layout = layout

    @abstractmethod
    def peer_info(self) -> PeerInfo:
        """What peers need to pull from this engine: published once through Ray by the worker."""

    @abstractmethod
    def add_peer(self, info: PeerInfo) -> None:
        """Connect to a peer so this engine can pull from it.

        Raises ValueError if the transport kinds or the KV layouts differ (the message names the field).
        Calling it again with the same record is a no-op; a new record under a known name replaces it.
        """

    @abstractmethod
    def remove_peer(self, name: str) -> None:
        """Forget a peer; a no-op for an unknown name. Transfers from it that are still pending fail."""

    two_sided: bool = False

    @abstractmethod
    def start_pull(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], key: int = 0) -> int:
        """Start copying the peer's blocks `src_block_ids[i]` into our blocks `dst_block_ids[i]`.

        Returns a handle for `poll`/`release`. Raises KVTransferError for a peer never added (or after
        `close`) and ValueError for mismatched or out-of-range ids; a failure of the transfer itself
        (peer gone, transport error) shows up as FAILED from `poll`, not as an exception here.
        """

    def start_serve(self, peer: str, src_block_ids: list[int], key: int) -> int | None:
        """Sender side of a two-sided transport: send our blocks `src_block_ids` to `peer`'s pull with `key`.

        Returns a handle for `poll`/`release` (DONE once the bytes have left), or None for a one-sided
        transport, which has nothing to do. The blocks must stay unchanged until the handle is DONE or
        released. Errors as `start_pull`.
        """
        return None

    @abstractmethod
    def poll(self, handle: int) -> TransferState:
        """The transfer's state now; never blocks. KeyError for a released or unknown handle."""

    @abstractmethod
    def release(self, handle: int) -> None:
        """Free the transfer's resources; idempotent. On a PENDING transfer, cancel it (waiting for a copy
        already under way to stop) so that the destination blocks are no longer written after this returns."""

    def error(self, handle: int) -> str | None:
        """Why a FAILED transfer failed, if the transport knows; None otherwise."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release every transfer and peer and deregister the cache; idempotent, safe to call twice."""

    async def pull(
        self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], timeout_s: float, key: int = 0
    ) -> None:
        """Start a pull and wait for it without blocking the event loop; always releases the handle.

        Polls at once, then sleeps with a backoff from 50 us up to 2 ms (never busy-spins: on a small host a
        spinning poll starves the transport's own copy threads). The default asyncio loop rounds sleeps under
        1 ms up to about 1 ms; a pull that completes inside `start_pull` never sleeps.
        Raises KVTransferError on FAILED or timeout.
        """
        handle = self.start_pull(peer, src_block_ids, dst_block_ids, key)
        await self._wait(handle, "pull", peer, src_block_ids, timeout_s)

    async def serve(self, peer: str, src_block_ids: list[int], key: int, timeout_s: float) -> None:
        """The sender-side step, awaited like `pull`; returns at once for a one-sided transport."""
        handle = self.start_serve(peer, src_block_ids, key)
        if handle is not None:
            await self._wait(handle, "serve", peer, src_block_ids, timeout_s)

    async def _wait(self, handle: int, what: str, peer: str, src_block_ids: list[int], timeout_s: float) -> None:
        try:
            deadline = time.monotonic() + timeout_s
            delay = _POLL_FIRST_S
            while (state := self.poll(handle)) is TransferState.PENDING:
                if time.monotonic() >= deadline:
                    raise KVTransferError(
                        f"{what} of {len(src_block_ids)} blocks with {peer!r} timed out after {timeout_s:.3g} s"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)
            if state is TransferState.FAILED:
                reason = self.error(handle)
                raise KVTransferError(
                    f"{what} of {len(src_block_ids)} blocks with {peer!r} failed" + (f": {reason}" if reason else "")
                )
        finally:
            self.release(handle)


def check_cache(kv_cache: torch.Tensor, layout: KVLayout) -> None:
    """The cache must be contiguous and block-major with `layout.num_blocks` blocks of `layout.block_bytes`."""
    if not kv_cache.is_contiguous():
        raise ValueError("the KV cache must be one contiguous tensor")
    if kv_cache.dim() == 0 or kv_cache.shape[0] != layout.num_blocks:
        raise ValueError(f"KV cache has shape {tuple(kv_cache.shape)}, layout says {layout.num_blocks} blocks")
    nbytes = kv_cache.numel() * kv_cache.element_size()
    if nbytes != layout.num_blocks * layout.block_bytes:
        raise ValueError(
            f"KV cache holds {nbytes} bytes, layout says {layout.num_blocks} blocks of {layout.block_bytes} bytes"
        )


def check_peer(local: KVLayout, kind: str, info: PeerInfo) -> None:
    """ValueError unless a peer's record can be pulled from by a transport of `kind` with layout `local`."""
    if info.transport != kind:
        raise ValueError(f"peer {info.name!r} uses the {info.transport!r} transport, this worker uses {kind!r}")
    reason = local.mismatch(info.layout)
    if reason is not None:
        raise ValueError(f"peer {info.name!r}: {reason}")


def check_block_ids(src: list[int], dst: list[int], num_src_blocks: int, num_dst_blocks: int) -> None:
    """ValueError for lists of different lengths or ids outside either cache."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source blocks but {len(dst)} destination blocks")
    if src and not (0 <= min(src) and max(src) < num_src_blocks):
        raise ValueError(f"source block ids must be in [0, {num_src_blocks}), got {min(src)}..{max(src)}")
    if dst and not (0 <= min(dst) and max(dst) < num_dst_blocks):
        raise ValueError(f"destination block ids must be in [0, {num_dst_blocks}), got {min(dst)}..{max(dst)}")


_TRANSPORTS = {
    "local": "pdserve.kv.transports.local:LocalTransport",
    "nixl": "pdserve.kv.transports.nixl:NixlTransport",
    "nccl": "pdserve.kv.transports.collective:CollectiveTransport",
}


def make_transport(kind: str, name: str, kv_cache: torch.Tensor, layout: KVLayout, **options) -> KVTransport:
    """Build the transport `kind` ("nixl", "nccl" or "local"); only the chosen one's library is imported."""
    if kind not in _TRANSPORTS:
        raise ValueError(f"unknown KV transport {kind!r}; choose one of {sorted(_TRANSPORTS)}")
    module, cls = _TRANSPORTS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(name, kv_cache, layout, **options)


def transport_options(config: KVConfig) -> dict:
    """`make_transport`'s options for `config.transport` from the config tree: `kv.nixl` for nixl (the other
    transports have no keys yet)."""
    return config.nixl.model_dump() if config.transport == "nixl" else {}
