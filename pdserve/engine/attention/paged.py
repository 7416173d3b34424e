"""FlashInfer's paged-KV format, built once per step with vectorised numpy: the one description of a step's
KV pages that the `flashinfer` and `flashinfer_reference` backends consume.

Sequence i's query rows are `qo_indptr[i]:qo_indptr[i+1]`; its pages are `kv_indices[kv_indptr[i]:kv_indptr[i+1]]`,
in order, all full but the last, which holds `kv_last_page_len[i]` tokens (1..page_size). Its KV length is
`(pages - 1) * page_size + last_page_len`, the new tokens included; the causal mask is aligned to the end of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PagedKV:
    qo_indptr: torch.Tensor  # int32 [num_seqs + 1]
    kv_indptr: torch.Tensor  # int32 [num_seqs + 1]
    kv_indices: torch.Tensor  # int32 [kv_indptr[-1]]
    kv_last_page_len: torch.Tensor  # int32 [num_seqs]
    page_size: int

    def to(self, device, non_blocking: bool = False) -> PagedKV:
        qo, kv, idx, last = (
            t.to(device, non_blocking=non_blocking)
            for t in (self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_last_page_len)
        )
        return PagedKV(qo, kv, idx, last, self.page_size)

    @property
    def num_seqs(self) -> int:
        return self.kv_last_page_len.shape[0]


def build_paged(query_lens: np.ndarray, kv_lens: np.ndarray, block_table: np.ndarray, page_size: int) -> PagedKV:
    """`block_table[i]` lists sequence i's blocks (padded past its last one); `kv_lens[i] >= 1` tokens are in the
    cache for it after this step, `query_lens[i]` of them new. Returns host (CPU) int32 tensors."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    n = len(kv_lens)
    if n and (kv_lens.min() < 1 or (query_lens > kv_lens).any()):
        raise ValueError("every sequence needs 1 <= query_len <= kv_len")
    pages = -(-kv_lens // page_size)
    if n and pages.max() > block_table.shape[1]:
        raise ValueError(f"a sequence needs {pages.max()} pages; its block table has {block_table.shape[1]}")
    qo_indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qo_indptr[1:])
    kv_indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(pages, out=kv_indptr[1:])
    used = np.arange(block_table.shape[1])[None, :] < pages[:, None]
    kv_indices = np.ascontiguousarray(block_table[:n][used], dtype=np.int32)  # row-major: each sequence's in order
    last = (kv_lens - (pages - 1) * page_size).astype(np.int32)
    t = torch.from_numpy
    return PagedKV(t(qo_indptr), t(kv_indptr), t(kv_indices), t(last), page_size)
