"""The offline side of the oracle check (pdserve.load.oracle): the checked loads' prompts, their greedy answers
from an undisturbed engine of this process's own, and `diagnose`, which says why a served text differs."""

from __future__ import annotations

from pdserve.load.oracle import Case

PROMPTS = [
    "The quick brown fox",
    "Serving engines batch many requests at once and keep the GPU busy.",
    "Hi",
    "chaos monkeys pull the plug " * 6,  # several KV blocks to hand off
    "a b c d e f g h i j k l m n o p",
    "Disaggregated prefill and decode: one worker computes the prompt, another one streams the answer.",
]
LONG_PROMPT = "a stream long enough to be moved while it runs " * 3
TIE_NATS = 1e-3  # float32 sums in another order (another batch) move a logit by ~1e-6 relative: far below this


def offline(prompts: list[str], max_tokens: int, long_max_tokens: int) -> tuple[list[Case], Case]:
    """The expected texts, from the offline engine (greedy, ignore_eos: every answer has max_tokens), and the
    long case (a stream that runs long enough to be migrated or left)."""
    from pdserve import LLM, SamplingParams

    llm = LLM(num_kv_blocks=256)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    (long,) = llm.generate([LONG_PROMPT], SamplingParams(temperature=0, max_tokens=long_max_tokens, ignore_eos=True))
    cases = [Case(p, max_tokens, o.text) for p, o in zip(prompts, outs)]
    return cases, Case(LONG_PROMPT, long_max_tokens, long.text)


def diagnose(wrong: list[tuple[Case, str]]) -> list[dict]:
    """Why a served text differs from the offline one: at the first token where they part, the offline run's
    log-probabilities of its own token and of the served one. `near_tie`: the served token was the offline
    runner-up by under TIE_NATS, so another batch's float32 rounding can flip the argmax (greedy decoding is
    not batch-invariant); anything else (a token far from the top, a shifted text) points at a real bug."""
    if not wrong:
        return []
    from pdserve import LLM, SamplingParams

    llm = LLM(num_kv_blocks=256)
    out = []
    for case, text in wrong:
        params = SamplingParams(temperature=0, max_tokens=case.max_tokens, ignore_eos=True, logprobs=5)
        (ref,) = llm.generate([case.prompt], params)
        tok = llm.tokenizer
        # the first offline token whose text the served text does not continue (text, not ids: a byte-level
        # tokenizer's partial UTF-8 decodes to U+FFFD, which does not encode back to the same ids)
        at = next((k for k in range(len(ref.token_ids)) if not text.startswith(tok.decode(ref.token_ids[: k + 1]))),
                  None)  # fmt: skip
        row = {"prompt": case.prompt[:60], "max_tokens": case.max_tokens, "diverges_at": at, "near_tie": False}
        if at is not None:
            top = ref.logprobs[at].top  # (token, logprob), best first: which of them the served text continues
            head = ref.token_ids[:at]
            rank = next((i + 1 for i, (t, _) in enumerate(top) if text.startswith(tok.decode(head + [t]))), None)
            gap = None if rank is None else ref.logprobs[at].logprob - top[rank - 1][1]
            tie = rank == 2 and gap is not None and gap < TIE_NATS
            row |= {"offline_token": ref.token_ids[at], "served_token": None if rank is None else top[rank - 1][0],
                    "served_rank": rank, "gap_nats": gap, "near_tie": tie}  # fmt: skip
        out.append(row)
    return out
