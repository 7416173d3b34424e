"""The ranks of a tensor-parallel engine on one host: rank 0 is the engine (scheduler, block manager, sampling);
ranks 1..N-1 are processes it spawns, each holding its slice of the weights and its heads' KV for the same
block ids. Each step rank 0 broadcasts the step's requests (tokens to compute, block ids) and every rank runs
the model; the collectives inside it (Gloo on CPU, NCCL on CUDA, with a Gloo group beside NCCL for the step
records) keep them in lockstep. Process groups are formed on a TCPStore that rank 0 hosts, not on
torch.distributed's global default group, so several engines can live in one process.

A rank that dies breaks the next collective on every other rank (Gloo fails on the closed connection; every op
is bounded by `TIMEOUT`), and the engine's step raises: the engine dies visibly, as a single-device one does.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(seconds=120)  # the bound on any collective: a peer gone or stuck fails the step after it
# "process": ranks are spawned processes (what engines do). "thread": threads of this process running the same
# rank_main, for tests of the sharded model that need not pay a process start per rank.
LAUNCH = "process"
_IDLE = timedelta(days=30)


class _Group:
    """A rank's groups: the collectives the model calls (a parallel.TPShard) and the step channel, over the
    low-level process-group API (no global default group)."""

    def __init__(self, store, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size = rank, size
        # the step channel waits as long as the engine idles; rank 0's death closes its sockets and ends the wait
        self.meta = dist.ProcessGroupGloo(dist.PrefixStore("meta", store), rank, size, _IDLE)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = TIMEOUT
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, options)
        else:
            self.data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, size, TIMEOUT)

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        self.data.allreduce([x], opts).wait(TIMEOUT)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.data.allgather([parts], [x]).wait(TIMEOUT)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled over the Gloo group)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.long)
        else:
            length = torch.zeros(1, dtype=torch.long)
        self.meta.broadcast([length]).wait(_IDLE)
        if self.rank != 0:
            data = torch.empty(int(length), dtype=torch.uint8)
        self.meta.broadcast([data]).wait(_IDLE)
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.meta.allreduce([t], opts).wait(TIMEOUT)  # host ints: Gloo, on CUDA too
        return int(t)


class _StepRequest:
    """The fields of a Request the step builder reads, carrying only the tokens this step computes."""

    def __init__(self, tokens: list[int], start: int, num_tokens: int, block_ids: list[int]) -> None:
        self.num_computed_tokens, self.num_tokens, self.block_ids = start, num_tokens, block_ids
        self.all_token_ids = _Window(tokens, start)


class _Window:
    def __init__(self, tokens: list[int], start: int) -> None:
        self.tokens, self.start = tokens, start

    def __getitem__(self, s: slice) -> list[int]:
        return self.tokens[s.start - self.start : s.stop - self.start]


class Ranks:
    """Rank 0's side: spawns ranks 1..N-1, joins the groups, broadcasts each step, stops them on `close`."""

    def __init__(self, config, device: torch.device) -> None:
        size = config.tensor_parallel_size
        host, port = "127.0.0.1", _free_port()
        self._store = dist.TCPStore(host, port, size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        payload = config.model_dump_json()
        make = mp.get_context("spawn").Process if LAUNCH == "process" else threading.Thread
        self.procs = [
            make(target=rank_main, args=(r, size, host, port, payload), daemon=True, name=f"pdserve-tp{r}")
            for r in range(1, size)
        ]
        self._closed = False
        for p in self.procs:
            p.start()
        try:
            self.group = _Group(self._store, 0, size, device)
        except BaseException:
            self._closed = True
            self._stop()
            raise

    def send_step(self, requests, num_new_tokens: list[int]) -> None:
        step = [
            (r.all_token_ids[r.num_computed_tokens : r.num_computed_tokens + n], r.num_computed_tokens, r.num_tokens,
             list(r.block_ids))
            for r, n in zip(requests, num_new_tokens)
        ]  # fmt: skip
        self.group.broadcast_object((step, list(num_new_tokens)))

    def close(self) -> None:
        """Idempotent: tells the ranks to exit, then waits for them (and kills any that do not)."""
        if self._closed:
            return
        self._closed = True
        try:
            if all(p.is_alive() for p in self.procs):
                self.group.broadcast_object(None)
        except Exception:
            pass  # a rank is already gone: the others fail on their next collective and exit
        self._stop()

    def _stop(self) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive() and isinstance(p, mp.process.BaseProcess):
                p.kill()
                p.join()


def rank_main(rank: int, size: int, host: str, port: int, config_json: str) -> None:
    """A non-zero rank: load its slice, size the KV cache as rank 0 does, run every step rank 0 broadcasts."""
    from pdserve.config import EngineConfig
    from pdserve.engine import loader
    from pdserve.engine.model_runner import ModelRunner, num_kv_blocks

    config = EngineConfig.model_validate_json(config_json)
    device = rank_device(config, rank)
    if device.type == "cpu" and LAUNCH == "process":  # the ranks share the host's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    store = dist.TCPStore(host, port, size, is_master=False, timeout=TIMEOUT)
    group = _Group(store, rank, size, device)
    loaded = loader.load(config.model, loader.torch_dtype(config.dtype), device, config.max_model_len, group)
    blocks = group.min(num_kv_blocks(config, loaded.model, loaded.info.max_model_len, device))
    runner = ModelRunner(loaded.model, config, blocks, device, loaded.info.max_model_len)
    while (msg := group.broadcast_object()) is not None:
        step, news = msg
        runner.execute([_StepRequest(*r) for r in step], news)


def rank_device(config, rank: int) -> torch.device:
    base = torch.device(config.device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
