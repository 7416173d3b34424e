"""Step time of the offline engine at TP 1 against TP 2 (ranks as spawned processes, Gloo, CPU), prefill and
decode at two batch sizes, and the share of rank 0's step spent in the model's collectives.

On this 2-core machine TP 2 cannot be faster: both ranks share the same two cores that TP 1 uses alone, so
this shows the overhead of the broadcast and the collectives, not a speed-up. The handoff between workers of
different degrees is not built yet, so it is not measured here.

    python bench/tensor_parallel.py [--steps 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import build_random_llama, print_table, write_json

BLOCK = 16


class _Req:
    def __init__(self, total: int, computed: int, blocks: list[int]) -> None:
        self.all_token_ids, self.num_computed_tokens, self.block_ids = [5] * total, computed, blocks
        self.num_tokens = total


def cases():
    """(name, batch, tokens computed per sequence, context per sequence after the step)."""
    return [("prefill", 1, 512, 512), ("prefill", 4, 256, 256), ("decode", 8, 1, 512), ("decode", 32, 1, 512)]


def run(model_dir: Path, tp: int, steps: int) -> dict:
    from pdserve import LLM

    with LLM(str(model_dir), tensor_parallel_size=tp, num_kv_blocks=32 * 33 + 8, max_num_seqs=32) as llm:
        runner = llm.engine.runner
        spent = [0.0]
        group = llm.engine.ranks.group if llm.engine.ranks else None
        if group is not None:  # time rank 0's collectives inside the model
            for name in ("all_reduce", "all_gather_last"):
                real = getattr(group, name)

                def timed(*a, _real=real, **k):
                    t = time.perf_counter()
                    out = _real(*a, **k)
                    spent[0] += time.perf_counter() - t
                    return out

                setattr(group, name, timed)
        out = {}
        for kind, batch, new, ctx in cases():
            pages = -(-ctx // BLOCK)
            reqs = [_Req(ctx, ctx - new, list(range(i * pages, (i + 1) * pages))) for i in range(batch)]
            runner.execute(reqs, [new] * batch)
            spent[0] = 0.0
            t = time.perf_counter()
            for _ in range(steps):
                runner.execute(reqs, [new] * batch)
            seconds = (time.perf_counter() - t) / steps
            out[(kind, batch)] = (seconds, spent[0] / steps)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    model_dir = build_random_llama(Path(tempfile.mkdtemp(prefix="pdserve-tp-")) / "llama", vocab=8192)
    one, two = run(model_dir, 1, args.steps), run(model_dir, 2, args.steps)
    rows = []
    for kind, batch, new, ctx in cases():
        (t1, _), (t2, coll) = one[(kind, batch)], two[(kind, batch)]
        rows.append(
            {
                "step": kind,
                "batch": batch,
                "tokens": batch * new,
                "context": ctx,
                "tp1_ms": round(t1 * 1e3, 2),
                "tp2_ms": round(t2 * 1e3, 2),
                "tp2/tp1": round(t2 / t1, 2),
                "tp2_collectives_share": round(coll / t2, 3),
            }
        )
    print_table(rows, list(rows[0]))
    print(write_json("tensor_parallel", {"model": "random llama 256x4, 8 heads, 4 KV heads", "rows": rows}))


if __name__ == "__main__":
    main()
