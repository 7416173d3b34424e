"""Decode steps at fixed batch sizes (1, 2, 4, 8, then every 16 up to max_num_seqs) from static buffers, as vLLM
and SGLang run them: n decodes run as the next size up, the padding rows writing and reading only the runner's
null block. On CUDA with a backend that can be captured, each size is captured once as a CUDA graph and
replayed; otherwise the same buffers and padding run eagerly, which is how CPU tests cover this path.
"""

from __future__ import annotations

import bisect
import logging

import torch

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class _PadRequest:
    """A padding row: one token at position 0 of the null block."""

    num_computed_tokens, num_tokens, all_token_ids = 0, 1, [0]

    def __init__(self, null_block: int) -> None:
        self.block_ids = [null_block]


class DecodeGraphs:
    def __init__(self, runner, sizes: list[int], max_pages: int, capture: bool) -> None:
        self.runner, self.sizes, self.max_pages, self.capture = runner, sizes, max_pages, capture
        self.num_steps = self.num_replays = 0  # static-shape steps run; of those, graph replays
        dev, top = runner.device, sizes[-1]
        self._ids, self._pos, self._slot_blocks, self._slot_offsets = (
            torch.zeros(top, dtype=torch.long, device=dev) for _ in range(4)
        )
        self._rows = torch.arange(top, device=dev)  # every row of a decode step is a logits row
        self._pad = _PadRequest(runner.null_block)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    @classmethod
    def create(cls, runner, config, max_model_len: int | None) -> DecodeGraphs | None:
        """None unless enabled: `engine.cuda_graphs` True, or unset on CUDA with a backend that can be captured."""
        graphable = runner.device.type == "cuda" and runner.backend.graphable
        enabled = config.cuda_graphs if config.cuda_graphs is not None else graphable
        if not enabled or max_model_len is None:
            if runner.device.type == "cuda" and config.cuda_graphs is None:
                log.info("cuda graphs off: attention backend %r cannot be captured", runner.backend.name)
            return None
        if config.cuda_graphs and runner.device.type == "cuda" and not graphable:
            log.warning("cuda_graphs: backend %r cannot be captured; decode runs eagerly", runner.backend.name)
        max_pages = -(-max_model_len // config.block_size)
        return cls(runner, capture_sizes(config.max_num_seqs), max_pages, capture=graphable)

    def fits(self, requests, num_new_tokens: list[int]) -> bool:
        return (
            len(requests) <= self.sizes[-1]
            and all(n == 1 for n in num_new_tokens)
            and all(len(r.block_ids) <= self.max_pages for r in requests)
        )

    def run(self, requests) -> tuple[torch.Tensor, list[int]]:
        n = len(requests)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        step = self.runner.inputs.build(list(requests) + [self._pad] * (size - n), [1] * size)
        self._ids[:size].copy_(step.input_ids)
        self._pos[:size].copy_(step.positions)
        self._slot_blocks[:size].copy_(step.attention.slot_blocks)
        self._slot_offsets[:size].copy_(step.attention.slot_offsets)
        sampled = [i for i in step.sampled if i < n]  # a 1-token chunk mid-prompt is computed but not sampled
        backend = self.runner.backend
        self.num_steps += 1
        if size in self._graphs:
            graph, meta, logits = self._graphs[size]
            backend.plan_graph(meta, step.attention)
            graph.replay()
            self.num_replays += 1
        else:
            step.attention.slot_blocks, step.attention.slot_offsets = self._slot_views(size)
            meta = backend.prepare(step.attention, self.runner.device)
            logits = self._forward(size, meta)
        return logits[torch.tensor(sampled, dtype=torch.long, device=logits.device)], sampled

    def _slot_views(self, size: int):
        return self._slot_blocks[:size], self._slot_offsets[:size]

    def _forward(self, size: int, meta) -> torch.Tensor:
        r = self.runner
        return r.model(self._ids[:size], self._pos[:size], r._kv, r.backend, meta, self._rows[:size])

    def _capture_all(self) -> None:
        """Largest size first, all graphs in one memory pool; each warmed up once eagerly before capture."""
        backend, pool = self.runner.backend, None
        pads = [self._pad] * self.sizes[-1]
        with torch.inference_mode():
            for size in reversed(self.sizes):
                step = self.runner.inputs.build(pads[:size], [1] * size)
                meta = backend.graph_meta(size, self.max_pages, *self._slot_views(size))
                backend.plan_graph(meta, step.attention)
                self._forward(size, meta)
                torch.cuda.synchronize(self.runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size, meta)
                pool = graph.pool()
                self._graphs[size] = (graph, meta, logits)
        log.info("captured %d decode CUDA graphs: batch sizes %s", len(self._graphs), self.sizes)
