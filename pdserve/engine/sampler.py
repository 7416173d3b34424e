"""Token sampling: greedy, temperature, top-k, top-p, per-request generators, and logprobs.

Random rows draw from their request's own torch.Generator (exponential-race sampling), so a request's
tokens depend only on its seed and its own history, never on what it is batched with, and the RNG state
can travel with the request when it moves to another engine.
"""

from __future__ import annotations

import torch

from pdserve.protocol import SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sub = logits[idx] / torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
        sub = _apply_top_k_top_p(sub, [params[i].top_k for i in rows], [params[i].top_p for i in rows])
        probs = sub.softmax(dim=-1)
        for j, i in enumerate(rows):
            noise = torch.empty_like(probs[j]).exponential_(generator=generators[i])
            out[i] = (probs[j] / noise).argmax()
    return out.tolist()


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    mask = ranks >= torch.tensor(ks, device=logits.device)[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly ahead of each token
    mask |= before >= torch.tensor(top_p, device=logits.device)[:, None]
    mask[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def compute_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens under the model's raw distribution, with top alternatives."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    k = max(num_top)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    out = []
    for row, (tok, lp, n) in enumerate(zip(token_ids, chosen, num_top)):
        top = list(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist())) if n else []
        out.append(TokenLogprob(token_id=tok, logprob=lp, top=top))
    return out
