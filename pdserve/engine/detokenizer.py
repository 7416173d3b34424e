"""Incremental detokenization and stop strings; text is released only when it is complete UTF-8.

Each step decodes a short window of trailing tokens and adds what it completes to the text, so the cost
per token is constant. A window ending in U+FFFD (a partial multi-byte character) adds nothing until the
next token completes it. `take()` releases text, holding back a tail that could still become a stop
string, so released text is never taken back.
"""

from __future__ import annotations

_CONTEXT = 5  # tokens of left context for decoding a window (spacing and merges at its start)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        stop: list[str],
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.ids = list(prompt_token_ids[-_CONTEXT:]) if tokenizer is not None else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # output text so far (truncated at a stop string once one is found)
        self.emitted = 0  # characters of `text` released by take()
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> None:
        """Append one output token; sets `stopped` when the text now contains a stop string."""
        if self.tokenizer is None or self.stopped:
            return
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return
        start = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if self.stop:
            search_from = max(0, start - self.holdback)
            hits = [(pos, s) for s in self.stop if (pos := self.text.find(s, search_from)) >= 0]
            if hits:
                pos, s = min(hits)
                self.text = self.text[: pos + len(s) if self.include_stop else pos]
                self.stopped = True

    def take(self, finished: bool) -> str:
        """Text not yet released; while running, minus a tail that may still be part of a stop string."""
        end = len(self.text) if finished or self.stopped else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
