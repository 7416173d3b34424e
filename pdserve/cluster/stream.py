"""One request's output as the client sees it, assembled from token-indexed deltas that may come from
several sources in turn (a retry after a worker's death, a continuation elsewhere): a duplicate is dropped,
a gap is an error, so the client never sees a token twice or misses one."""

from __future__ import annotations

from pdserve.engine_client import WorkerFailed
from pdserve.protocol import TokenDelta


class StreamGap(WorkerFailed):
    """A delta started past the next token the client needs: tokens were lost on the way."""


class TokenStream:
    def __init__(self) -> None:
        self.next_index = 0  # output tokens the client has
        self.finished = False

    def accept(self, delta: TokenDelta, base: int = 0) -> TokenDelta | None:
        """The delta to pass on (its `index` made absolute: `base` + the source's own), or None for a
        duplicate. Engines emit at most one token per delta, so a delta is new, or seen, or a gap."""
        start = base + delta.index
        if start > self.next_index:
            raise StreamGap(f"{delta.request_id}: expected token {self.next_index}, the source sent {start}")
        if delta.new_token_ids and start + len(delta.new_token_ids) <= self.next_index:
            return None  # already sent (from an earlier source)
        if start < self.next_index and delta.new_token_ids:
            raise StreamGap(f"{delta.request_id}: a delta overlapping token {self.next_index} cannot be split")
        delta.index = start
        self.next_index = start + len(delta.new_token_ids)
        self.finished = delta.finished
        return delta
