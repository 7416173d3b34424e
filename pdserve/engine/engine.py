"""LLMEngine: requests in, token deltas out; `step()` = schedule -> run the model -> sample -> postprocess.

Roles: a PREFILL request is held (blocks kept) after its first token, for a peer to pull; the handoff
operations (export, import, live-migration stages) are `engine.handoff` (`engine/handoff.py`).
"""

from __future__ import annotations

import time

import torch

from pdserve.config import EngineConfig
from pdserve.engine import loader
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.handoff import EngineHandoff, OutOfKVBlocks  # noqa: F401 (re-exported)
from pdserve.engine.model_runner import ModelRunner, num_kv_blocks
from pdserve.engine.sampler import compute_logprobs, sample
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Request, Role, Status
from pdserve.hashing import BlockHash, root_hash
from pdserve.protocol import KVEvent, SamplingParams, TokenDelta


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.device = torch.device(config.device)
        self.ranks = _start_ranks(config, self.device)
        try:
            tp = self.ranks.group if self.ranks else None
            loaded = loader.load(config.model, loader.torch_dtype(config.dtype), self.device, config.max_model_len, tp)
            blocks = num_kv_blocks(config, loaded.model, loaded.info.max_model_len, self.device)
            blocks = self.ranks.group.min(blocks) if self.ranks else blocks  # every rank holds the same block ids
        except BaseException:
            self.close()
            raise
        self.info = info = loaded.info
        self.model_id = info.model_id
        self.is_demo = info.is_demo
        self.tokenizer = info.tokenizer
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.runner = ModelRunner(loaded.model, config, blocks, self.device, info.max_model_len, self.ranks)
        self.blocks = BlockManager(blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._seeds = torch.Generator().manual_seed(config.seed)
        self.eos_token_ids = info.eos_token_ids
        self.num_computed_tokens_total = 0
        self.num_preemptions_total = 0
        self.num_generated_tokens_total = 0
        self.parked_ids: list[str] = []  # parked under memory pressure since the worker last took them
        # The admission bound (None: none, as offline): at most max_num_seqs + max_waiting requests admitted.
        # Admitted: running, parked, waiting, importing (WAITING_FOR_REMOTE_KVS), or holding a reserved slot.
        self.max_waiting: int | None = None
        self.reserved_slots: set[str] = set()  # requests whose KV will arrive by a handoff (decode side)
        self.handoff = EngineHandoff(self)

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.runner.kv_cache

    # ---- admission -------------------------------------------------------------------------------
    @property
    def admission_limit(self) -> int | None:
        return None if self.max_waiting is None else self.scheduler.max_num_seqs + self.max_waiting

    def num_admitted(self) -> int:
        sched = self.scheduler
        importing = sum(r.status is Status.WAITING_FOR_REMOTE_KVS for r in self.requests.values())
        return len(sched.running) + len(sched.parked) + len(sched.waiting) + importing + len(self.reserved_slots)

    def has_room(self, request_id: str) -> bool:
        """Whether `request_id` may enter now: it holds a reserved slot, or fewer than the bound are admitted.
        The engine is the authority on its own queue: a caller checks this and adds in one engine command."""
        limit = self.admission_limit
        return limit is None or request_id in self.reserved_slots or self.num_admitted() < limit

    def reserve_slot(self, request_id: str) -> bool:
        """Count a request whose KV will come by a handoff as admitted now (its import takes the slot over;
        `abort` gives it back). False, and nothing changes, when the engine is at its bound."""
        if not self.has_room(request_id):
            return False
        self.reserved_slots.add(request_id)
        return True

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem; the engine is unchanged."""
        self.info.validate(prompt_token_ids, params)
        if -(-len(prompt_token_ids) // self.blocks.block_size) >= self.blocks.num_blocks:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, more than the KV cache holds "
                f"(num_kv_blocks={self.blocks.num_blocks} of {self.blocks.block_size} tokens)"
            )

    def _new_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, role: Role, cache_salt: str | None
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
        )
        generator = torch.Generator(self.device).manual_seed(seed)  # sampling draws on the logits' device
        root = root_hash(self.model_id, cache_salt)
        return Request(request_id, prompt_token_ids, params, role, detok, generator, root, cache_salt)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        role: Role | str = Role.COLOCATED,
        cache_salt: str | None = None,
    ) -> None:
        """`cache_salt`: requests share prefix-cached KV only with requests under the same salt (None is one)."""
        role = _role(role)
        if role is Role.DECODE:
            raise ValueError("a decode-role request enters by import_request, not add_request")
        self.validate(prompt_token_ids, params)
        req = self._new_request(request_id, prompt_token_ids, params, role, cache_salt)
        self.requests[request_id] = req
        self.reserved_slots.discard(request_id)
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        self.reserved_slots.discard(request_id)
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.remove(req)
        self._finish(req, "abort")
        return True

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel engine; idempotent (nothing to do at degree 1)."""
        if self.ranks is not None:
            self.ranks.close()

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` is live here (in any state: queued, running, held, importing)."""
        return request_id in self.requests

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        batch = self.scheduler.schedule()
        self.num_preemptions_total += len(batch.preempted)
        self.parked_ids += [r.request_id for r in batch.parked]
        deltas = [self._finish(req, "length") for req in batch.out_of_blocks]
        if batch.empty:
            return deltas
        logits, sampled = self.runner.execute(batch.requests, batch.num_new_tokens)
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            self.num_computed_tokens_total += n
            self._cache_full_blocks(req)
        reqs = [batch.requests[i] for i in sampled]
        if not reqs:  # only prefill chunks this step: nothing to sample
            return deltas
        token_ids = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        logprobs = self._logprobs(logits, reqs, token_ids)
        for j, (req, token) in enumerate(zip(reqs, token_ids)):
            deltas.append(self._postprocess(req, token, logprobs[j] if logprobs else None))
        return deltas

    def _logprobs(self, logits, reqs, token_ids):
        if all(r.params.logprobs is None for r in reqs):
            return None
        return compute_logprobs(logits, token_ids, [r.params.logprobs or 0 for r in reqs])

    def _postprocess(self, req: Request, token: int, logprob) -> TokenDelta:
        self.num_generated_tokens_total += 1
        first = req.first_token_time is None
        if first:
            req.first_token_time = time.monotonic()
        req.append_token(token)
        req.detokenizer.add(token)
        p = req.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids) or req.detokenizer.stopped:
            reason = "stop"
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        delta = TokenDelta(
            request_id=req.request_id,
            new_token_ids=[token],
            index=len(req.output_token_ids) - 1,
            text=req.detokenizer.take(reason is not None),
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=[logprob] if logprob is not None else None,
        )
        if first and req.first_scheduled_time is not None:
            delta.queue_s = req.first_scheduled_time - req.arrival_time
            delta.prefill_s = req.first_token_time - req.first_scheduled_time
        if reason is not None:
            self.scheduler.remove(req)
            self._finish(req, reason)
            delta.finished, delta.finish_reason = True, reason
        elif req.role is Role.PREFILL and len(req.output_token_ids) == 1:
            self.scheduler.remove(req)
            req.status = Status.HELD
            delta.held = True
        return delta

    def _cache_full_blocks(self, req: Request) -> None:
        full = req.num_computed_tokens // self.blocks.block_size
        if full > req.num_cached_blocks:
            hashes = req.update_hashes(self.blocks.block_size)
            self.blocks.cache_blocks(req.block_ids, hashes, req.all_token_ids, req.num_cached_blocks, full, req.root)
            req.num_cached_blocks = full

    def _finish(self, req: Request, reason: str) -> TokenDelta:
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        return TokenDelta(
            request_id=req.request_id,
            new_token_ids=[],
            index=len(req.output_token_ids),
            text=req.detokenizer.take(True),
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
        )

    def _get(self, request_id: str, states: tuple[Status, ...]) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"no live request {request_id!r}")
        if req.status not in states:
            raise ValueError(f"request {request_id!r} is {req.status.value}, expected {[s.value for s in states]}")
        return req

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache events since the last call; recording starts with the first call."""
        self.blocks.record_events = True
        return self.blocks.take_events()

    def kv_snapshot(self) -> list[BlockHash]:
        """All cached block hashes, and a fresh start for the event stream (taken together, atomically)."""
        self.take_kv_events()
        return self.blocks.cached_hashes()

    def stats(self) -> dict:
        """Load numbers for the worker's report (plain values; the worker wraps them in WorkerStats)."""
        sched = self.scheduler
        queued = sum(self._prefill_left(r) for r in [*sched.waiting, *sched.running] if not r.output_token_ids)
        return {
            "num_running": len(sched.running) + len(sched.parked),
            "num_waiting": len(sched.waiting),
            "num_free_slots": max(0, sched.max_num_seqs - self.num_admitted()),
            "num_held": sum(r.status is Status.HELD for r in self.requests.values()),
            "num_importing": sum(r.status is Status.WAITING_FOR_REMOTE_KVS for r in self.requests.values())
            + len(self.reserved_slots),
            "num_free_blocks": self.blocks.num_free_blocks,
            "num_blocks": self.blocks.num_blocks,
            "kv_usage": self.blocks.usage,
            "num_prefill_tokens_queued": queued,
            "num_generated_tokens_total": self.num_generated_tokens_total,
        }

    def _prefill_left(self, req: Request) -> int:
        """Prompt tokens this engine still has to compute for `req`; for a request not yet scheduled, less
        the prefix its cache holds now (as scheduling it would reuse, unless evicted first)."""
        if req.num_computed_tokens or not self.blocks.enable_prefix_caching:
            return req.num_tokens - req.num_computed_tokens
        return req.num_tokens - len(self.scheduler.cached_prefix(req)) * self.blocks.block_size


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValueError(f"role must be one of {[r.value for r in Role]}, got {role!r}") from None


def _start_ranks(config: EngineConfig, device: torch.device):
    """Ranks 1..N-1 of a tensor-parallel engine, once the degree is known to fit the model."""
    if config.tensor_parallel_size == 1:
        return None
    from pdserve.engine.models import spec_from_config
    from pdserve.engine.parallel import check_degree
    from pdserve.engine.tensor_parallel import Ranks
    from pdserve.model_info import load_model_info

    check_degree(
        spec_from_config(load_model_info(config.model, config.max_model_len).config), config.tensor_parallel_size
    )
    return Ranks(config, device)
