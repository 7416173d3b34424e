"""The engine's `TokenLogprob`s as OpenAI logprobs objects (completions' legacy shape and chat's)."""

from __future__ import annotations

from functools import lru_cache

from pdserve.api.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from pdserve.protocol import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf; a token the model rules out gets this instead


class TokenStrings:
    """Each token id's own text (special tokens included); a token ending inside a UTF-8 character
    decodes to U+FFFD, as in OpenAI's API."""

    def __init__(self, tokenizer) -> None:
        self._decode = lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t], skip_special_tokens=False))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)


def _lp(x: float) -> float:
    return x if x > _FLOOR else _FLOOR


def completion_logprobs(
    entries: list[TokenLogprob], strings: TokenStrings, offset: int = 0
) -> tuple[CompletionLogprobs, int]:
    """The completions object for `entries`, whose text starts at `offset`; returns the next offset.

    `top_logprobs` always lists the sampled token too, so it may hold `logprobs + 1` entries (as OpenAI).
    """
    out = CompletionLogprobs()
    for e in entries:
        token = strings(e.token_id)
        top = {strings(t): _lp(lp) for t, lp in e.top}
        top.setdefault(token, _lp(e.logprob))
        out.tokens.append(token)
        out.token_logprobs.append(_lp(e.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out, offset


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings) -> ChatLogprobs:
    content = []
    for e in entries:
        token = strings(e.token_id)
        top = [TopLogprob(token=(s := strings(t)), logprob=_lp(lp), bytes=list(s.encode())) for t, lp in e.top]
        content.append(
            ChatTokenLogprob(token=token, logprob=_lp(e.logprob), bytes=list(token.encode()), top_logprobs=top)
        )
    return ChatLogprobs(content=content)
