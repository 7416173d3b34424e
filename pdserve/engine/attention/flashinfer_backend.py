"""FlashInfer's paged kernels (CUDA): `plan()` once per step from the shared `PagedKV` tables, `run()` per layer.
Decode-only steps use the decode wrapper, any step with a multi-token query the prefill wrapper (causal).
Each layer's view of the block-major cache is passed as is: FlashInfer reads the page stride from the tensor.

Not yet verified on a GPU: bench/gpu_check.py compares it with `flashinfer_reference` and `torch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionBatch
from pdserve.engine.attention.paged import PagedKV

_WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace, as its examples and vLLM size it


@dataclass
class FlashInferMeta:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    wrapper: object  # the planned decode or prefill wrapper


class FlashInferAttention:
    name = "flashinfer"
    graphable = True

    def __init__(self, device: torch.device, spec, dtype: torch.dtype, block_size: int) -> None:
        import flashinfer

        self._fi = flashinfer
        self.device, self.dtype, self.page_size = device, dtype, block_size
        self.heads = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
        self.scale = spec.head_dim**-0.5
        self._workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._tensor_cores = spec.num_heads // spec.num_kv_heads >= 4  # grouped heads: the prefill kernel decodes
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=self._tensor_cores
        )
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")

    def prepare(self, batch: AttentionBatch, device: torch.device) -> FlashInferMeta:
        p = batch.paged
        if int(batch.query_lens.max(initial=0)) <= 1:
            self._plan_decode(self._decode, p)
            wrapper = self._decode
        else:
            hq, hkv, d = self.heads
            self._prefill.plan(
                p.qo_indptr,
                p.kv_indptr,
                p.kv_indices.to(device, non_blocking=True),
                p.kv_last_page_len,
                hq,
                hkv,
                d,
                self.page_size,
                causal=True,
                sm_scale=self.scale,
                q_data_type=self.dtype,
                kv_data_type=self.dtype,
            )
            wrapper = self._prefill
        return FlashInferMeta(batch.slot_blocks, batch.slot_offsets, wrapper)

    def _plan_decode(self, wrapper, p: PagedKV) -> None:
        hq, hkv, d = self.heads
        wrapper.plan(
            p.kv_indptr,
            p.kv_indices.to(self.device, non_blocking=True),
            p.kv_last_page_len,
            hq,
            hkv,
            d,
            self.page_size,
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    # ---- CUDA graphs: one decode wrapper per captured batch size, over static page tables -----------------
    def graph_meta(self, size: int, max_pages: int, slot_blocks, slot_offsets) -> FlashInferMeta:
        dev = self.device
        wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self._tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(size * max_pages, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(size, dtype=torch.int32, device=dev),
        )
        return FlashInferMeta(slot_blocks, slot_offsets, wrapper)

    def plan_graph(self, meta: FlashInferMeta, batch: AttentionBatch) -> None:
        self._plan_decode(meta.wrapper, batch.paged)

    def forward(self, q, k, v, kv_layer, meta: FlashInferMeta, scale: float) -> torch.Tensor:
        kv_layer[:, 0][meta.slot_blocks, meta.slot_offsets] = k
        kv_layer[:, 1][meta.slot_blocks, meta.slot_offsets] = v
        return meta.wrapper.run(q, kv_layer)
