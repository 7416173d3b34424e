"""Offline generation throughput: pdserve's engine against transformers' `generate`, same model and prompts.

Workloads: (a) `mixed`: N prompts of 64-1024 tokens with 64-256 output tokens each (greedy, EOS ignored);
(b) `single`: one 512-token prompt, 128 output tokens. transformers runs each workload as one left-padded
batch (its static batching: every row decodes until the longest request is done; only each request's own
output tokens count as useful). Prints a table with pdserve/transformers ratios and writes JSON.

    python bench/engine.py [--num-prompts 64] [--quick]
    python bench/engine.py --step-inputs    # the host time to build a step's inputs (bench/step_inputs.py)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import Timer, build_random_llama, print_table, write_json


def workload(n: int, prompt_range, output_range, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    outputs = [rng.randint(*output_range) for _ in range(n)]
    return prompts, outputs


def run_pdserve(llm, prompts, outputs):
    from pdserve import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outputs]
    with Timer() as t:
        outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == outputs
    return t.seconds, [o.token_ids for o in outs]


def run_transformers(model, prompts, outputs):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with Timer() as t, torch.inference_mode():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(outputs),
            min_new_tokens=max(outputs),
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    new = gen[:, width:]
    return t.seconds, [new[i, : outputs[i]].tolist() for i in range(len(prompts))], new.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="small workload for a smoke run")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse/create the random model here")
    ap.add_argument("--step-inputs", action="store_true", help="run bench/step_inputs.py instead")
    args = ap.parse_args()
    if args.step_inputs:
        from bench import step_inputs

        sys.argv = sys.argv[:1]
        return step_inputs.main()
    from transformers import AutoModelForCausalLM

    from pdserve import LLM

    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="pdserve-bench-")) / "llama"
    build_random_llama(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    n = 8 if args.quick else args.num_prompts
    scale = 4 if args.quick else 1
    cases = {
        "mixed": workload(n, (64 // scale, 1024 // scale), (64 // scale, 256 // scale), vocab, seed=1),
        "single": workload(1, (512 // scale, 512 // scale), (128 // scale, 128 // scale), vocab, seed=2),
    }
    llm = LLM(str(model_dir), max_num_seqs=128, max_num_batched_tokens=2048, enable_prefix_caching=False)
    llm.generate([[5] * 16], None)  # warm up both paths once
    run_transformers(hf, [[5] * 16], [4])
    rows = []
    for name, (prompts, outputs) in cases.items():
        pd_s, pd_tokens = run_pdserve(llm, prompts, outputs)
        hf_s, hf_tokens, hf_generated = run_transformers(hf, prompts, outputs)
        useful = sum(outputs)
        total = useful + sum(len(p) for p in prompts)
        same = sum(a == b for a, b in zip(pd_tokens, hf_tokens))
        rows.append(
            {
                "workload": name,
                "requests": len(prompts),
                "prompt_tokens": total - useful,
                "output_tokens": useful,
                "pdserve_s": pd_s,
                "transformers_s": hf_s,
                "pdserve_out_tok_s": useful / pd_s,
                "transformers_out_tok_s": useful / hf_s,
                "speedup": hf_s / pd_s,
                "transformers_generated_tokens": hf_generated,
                "identical_outputs": f"{same}/{len(prompts)}",
            }
        )
    columns = [
        "workload",
        "requests",
        "prompt_tokens",
        "output_tokens",
        "pdserve_s",
        "transformers_s",
        "pdserve_out_tok_s",
        "transformers_out_tok_s",
        "speedup",
        "identical_outputs",
    ]
    print_table(rows, columns)
    path = write_json(
        "engine",
        {
            "torch_threads": torch.get_num_threads(),
            "model": str(model_dir),
            "config": hf.config.to_dict(),
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
