"""The engine's half of every KV handoff, held by the engine as `engine.handoff`: on the sender it exports
(holds), releases and resumes requests and holds a migration stage's full blocks; on the receiver it reserves
(imports, stages), drops and finishes. Engine-thread only; requests enter the scheduler by its entry points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdserve.engine.sequence import Role, Status
from pdserve.hashing import block_hashes, root_hash
from pdserve.protocol import ExportedRequest, KVReservation

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine

_LIVE = (Status.WAITING, Status.RUNNING, Status.HELD)


class OutOfKVBlocks(RuntimeError):
    """Not enough free KV blocks to reserve for an import right now (retry later or pick another engine)."""


class EngineHandoff:
    """Owned by one LLMEngine; every method runs on its engine thread, between steps."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.blocks = engine.blocks
        self.scheduler = engine.scheduler

    # ---- sender ------------------------------------------------------------------------------------
    def export_request(self, request_id: str) -> tuple[ExportedRequest, list[int]]:
        """Stop scheduling a live request and describe it; its blocks stay held until `release` (or
        `resume`, which schedules it again here)."""
        req = self.engine._get(request_id, _LIVE)
        if req.status is not Status.HELD:
            self.scheduler.remove(req)
            req.status = Status.HELD
        n = -(-req.num_computed_tokens // self.blocks.block_size)
        record = ExportedRequest(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            num_computed_tokens=req.num_computed_tokens,
            params=req.params,
            rng_state=bytes(req.generator.get_state().numpy()),
            num_cached_tokens=req.num_cached_tokens,
            block_size=self.blocks.block_size,
            model_id=self.engine.model_id,
            text_emitted=req.detokenizer.emitted,
            cache_salt=req.cache_salt,
        )
        return record, req.block_ids[:n]

    def is_held(self, request_id: str) -> bool:
        req = self.engine.requests.get(request_id)
        return req is not None and req.status is Status.HELD

    def release(self, request_id: str) -> bool:
        """Free a held request's blocks (its peer has its KV, or the handoff was abandoned); False, and
        nothing changes, unless it is held here."""
        if not self.is_held(request_id):
            return False
        self.engine._finish(self.engine.requests[request_id], "abort")
        return True

    def resume(self, request_id: str) -> bool:
        """Schedule an exported (held) request here again, as if it had never stopped; False if it is gone."""
        req = self.engine.requests.get(request_id)
        if req is None or req.status is not Status.HELD or req.role is Role.PREFILL:
            return False
        self.scheduler.admit(req)
        return True

    def hold_full_blocks(self, request_id: str, start: int) -> tuple[list[int], list[int], int, str | None] | None:
        """Live migration, a stage on the sender: the request's full blocks from position `start` on (their
        KV never changes again) with a reference taken on each, so they outlive the request if it ends
        before the copy does; and the tokens those blocks cover, from the first. None unless the request
        is running or parked here with at least `start` full blocks (it finished, was aborted or preempted).
        Also returns how many blocks its KV fills now (the last one may be partly filled), and its cache
        salt. `release_blocks` drops the references."""
        req = self.engine.requests.get(request_id)
        if req is None or req.status not in (Status.RUNNING, Status.HELD) or req.role is Role.PREFILL:
            return None
        full = req.num_computed_tokens // self.blocks.block_size
        if full < start or len(req.block_ids) < full:
            return None
        ids = req.block_ids[start:full]
        self.blocks.touch(ids)
        bs = self.blocks.block_size
        return ids, req.all_token_ids[: full * bs], -(-req.num_computed_tokens // bs), req.cache_salt

    def release_blocks(self, block_ids: list[int]) -> None:
        """Drop the references `hold_full_blocks` took."""
        self.blocks.free(block_ids)

    def unpark(self, request_id: str) -> None:
        """A parked request that did not migrate runs here again (and is preempted, not parked, next time)."""
        req = self.engine.requests.get(request_id)
        if req is not None:
            self.scheduler.unpark(req)

    def migratable(self) -> list[tuple[str, int]]:
        """(request id, blocks it holds) of every request a migration could move now."""
        return [
            (r.request_id, len(r.block_ids))
            for r in [*self.scheduler.running, *self.scheduler.parked]
            if r.role is not Role.PREFILL and r.output_token_ids
        ]

    # ---- receiver ----------------------------------------------------------------------------------
    def stage_blocks(
        self, token_ids: list[int], have: list[int], cache_salt: str | None = None
    ) -> tuple[list[int], int]:
        """Live migration, a stage on the receiver: blocks for the full blocks of `token_ids` past the
        `have` ones already staged. Blocks this engine's prefix cache holds under the request's `cache_salt`
        are reused (a reference taken); the rest are allocated. Returns (new block ids, how many of them came
        from the cache: those lead the list and need no copy). Raises OutOfKVBlocks and changes nothing when
        they do not fit."""
        bs = self.blocks.block_size
        root = root_hash(self.engine.model_id, cache_salt)
        hashes = block_hashes(token_ids, bs, root)[: len(token_ids) // bs]
        cached = self.blocks.cached_prefix(hashes, token_ids, root)[len(have) :]
        need = len(hashes) - len(have) - len(cached)
        reclaimed = self._num_free(cached)
        if need < 0 or not self.blocks.can_allocate(max(need, 0) + reclaimed):
            raise OutOfKVBlocks(f"staging needs {need + reclaimed} free KV blocks, {self.blocks.num_free_blocks} free")
        self.blocks.touch(cached)
        return cached + self.blocks.allocate(need), len(cached)

    def drop_blocks(self, block_ids: list[int]) -> None:
        """Give back staged blocks of a migration that did not complete."""
        self.blocks.free(block_ids)

    def import_request(self, record: ExportedRequest, have: list[int] | None = None) -> KVReservation:
        """Reserve blocks for an exported request's KV. `have`: blocks already holding its first KV blocks
        (staged by a migration; this takes over their references); otherwise this engine's own cached prefix
        is reused. KVReservation.num_cached_blocks says how many leading blocks need no copy. Raises
        OutOfKVBlocks (or ValueError) and changes nothing when it cannot."""
        eng = self.engine
        if record.model_id != eng.model_id or record.block_size != self.blocks.block_size:
            raise ValueError(
                f"cannot import {record.request_id!r}: it comes from model {record.model_id!r} with block_size "
                f"{record.block_size}, this engine serves {eng.model_id!r} with block_size {self.blocks.block_size}"
            )
        eng.validate(record.prompt_token_ids, record.params)
        req = eng._new_request(
            record.request_id, record.prompt_token_ids, record.params, Role.DECODE, record.cache_salt
        )
        for token in record.output_token_ids:
            req.append_token(token)
            req.detokenizer.add(token)
        req.detokenizer.emitted = min(record.text_emitted, len(req.detokenizer.text))  # the sender emitted these
        req.generator.set_state(torch.frombuffer(bytearray(record.rng_state), dtype=torch.uint8))
        req.num_computed_tokens = record.num_computed_tokens
        req.num_cached_tokens = record.num_cached_tokens
        req.admitted = True
        req.first_token_time = req.arrival_time  # its first token came from the sender: no queue time here
        bs = self.blocks.block_size
        hashes = req.update_hashes(bs)
        total = -(-record.num_computed_tokens // bs)
        if have is not None:
            if len(have) > total:
                raise ValueError(f"{len(have)} staged blocks for {record.request_id!r}, its KV fills {total}")
            cached, reclaimed = list(have), 0
        else:
            cached = self.blocks.cached_prefix(hashes[: record.num_computed_tokens // bs], req.all_token_ids, req.root)
            reclaimed = self._num_free(cached)
        need = total - len(cached)
        if not self.blocks.can_allocate(need + reclaimed):
            raise OutOfKVBlocks(
                f"import of {record.request_id!r} needs {need + reclaimed} free KV blocks, "
                f"{self.blocks.num_free_blocks} free"
            )
        if have is None:
            self.blocks.touch(cached)
        req.block_ids = cached + self.blocks.allocate(need)
        req.num_cached_blocks = 0 if have is not None else len(cached)  # staged blocks get cached at finish
        req.status = Status.WAITING_FOR_REMOTE_KVS
        eng.requests[req.request_id] = req
        eng.reserved_slots.discard(req.request_id)  # counted as importing from now on
        return KVReservation(request_id=req.request_id, block_ids=list(req.block_ids), num_cached_blocks=len(cached))

    def finish_import(self, request_id: str) -> None:
        """The reserved blocks now hold the KV: register them in the prefix cache and schedule the request
        (through the scheduler's admission, which keeps `max_num_seqs`)."""
        req = self.engine._get(request_id, (Status.WAITING_FOR_REMOTE_KVS,))
        self.engine._cache_full_blocks(req)
        self.scheduler.admit(req)

    def _num_free(self, block_ids: list[int]) -> int:
        """Cached blocks with no reference sit in the free pool: taking them takes from the pool too."""
        return sum(self.blocks.blocks[b].ref_cnt == 0 for b in block_ids)
