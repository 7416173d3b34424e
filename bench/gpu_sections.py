"""The sections of bench/gpu_check.py: each takes a Context and returns a JSON-able dict with `ok`, optional
`rows` for the table, and `skipped` (a reason) where this machine cannot run it."""

from __future__ import annotations

import importlib.util
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.common import build_random_llama
from pdserve.config import EngineConfig
from pdserve.engine.attention import get_backend
from pdserve.engine.step_inputs import StepInputBuilder

PARITY_LENGTHS = [5, 40, 100, 3, 17, 150]  # tests/unit/test_parity.py's single and batched prompt lengths


@dataclass
class Context:
    device: torch.device
    smoke: bool
    work: Path
    _models: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def model_dir(self, size: str = "small") -> Path:
        """small: the parity model (test-sized); medium: ~0.4 B parameters, for the load-memory check."""
        if size == "medium" and not self.smoke:
            shape = dict(hidden=2048, layers=8, heads=16, kv_heads=8, intermediate=5632, vocab=32000)
        else:
            shape = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768, vocab=2048)
        if size not in self._models:
            self._models[size] = build_random_llama(self.work / size, **shape)
        return self._models[size]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def prompts(n_vocab: int, lengths=PARITY_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, n_vocab) for _ in range(n)] for n in lengths]


# ---- env ---------------------------------------------------------------------------------------------------
def env(ctx: Context) -> dict:
    info = {"ok": True, "torch": torch.__version__, "cuda": torch.version.cuda}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    for mod in ("flashinfer", "nixl", "transformers"):
        spec = importlib.util.find_spec(mod)
        info[mod] = "missing" if spec is None else _version(mod)
    return info


def _version(mod: str) -> str:
    try:
        return getattr(__import__(mod), "__version__", "present")
    except Exception as e:  # importable but broken: say so
        return f"import fails: {e}"


# ---- parity ------------------------------------------------------------------------------------------------
def parity(ctx: Context) -> dict:
    from transformers import AutoModelForCausalLM

    from pdserve import LLM, SamplingParams

    model_dir, n_new = ctx.model_dir(), 8 if ctx.smoke else 16
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(ctx.device).eval()
    ps = prompts(hf.config.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    engines = {d: LLM(model=str(model_dir), dtype=d, device=str(ctx.device), num_kv_blocks=512) for d in _dtypes(ctx)}
    outs = {d: [o.token_ids for o in llm.generate(ps, greedy)] for d, llm in engines.items()}
    with torch.inference_mode():
        hf_tokens = [_hf_greedy(hf, p, n_new, ctx.device) for p in ps]
        bf_err = _bf16_logit_error(hf, ps, ctx.device)
    rows, explained = [], True
    for p, ref, hft, low in zip(ps, outs["float32"], hf_tokens, outs[_dtypes(ctx)[-1]]):
        d = next((i for i, (a, b) in enumerate(zip(ref, low)) if a != b), len(ref))
        gap = _top1_gap(hf, p + ref[:d], ctx.device) if d < len(ref) else None
        ok = gap is None or gap < 2 * bf_err
        explained &= ok
        rows.append(
            {
                "prompt": len(p),
                "f32=hf": ref == hft,
                "low_agree": f"{d}/{len(ref)}",
                "f32_gap_at_split": gap,
                "noise": ok,
            }
        )
    sampled = _sampling(engines["float32"], ps[:4])
    f32_hf = all(r["f32=hf"] for r in rows)
    return {
        "ok": f32_hf and explained and sampled["same_seed_same"] and sampled["other_seed_differs"],
        "rows": rows,
        "low_dtype": _dtypes(ctx)[-1],
        "bf16_logit_error": bf_err,
        "tolerance": "a low-precision divergence is noise where float32's top-1 gap there is < 2x the measured "
        "bf16 logit error (max |bf16 - f32| over the prompts' last positions)",
        **sampled,
    }


def _dtypes(ctx: Context) -> list[str]:
    return ["float32", "bfloat16"]


def _hf_greedy(hf, prompt, n, device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _top1_gap(hf, tokens, device) -> float:
    with torch.inference_mode():
        logits = hf(torch.tensor([tokens], device=device)).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def _bf16_logit_error(hf, ps, device) -> float:
    low = type(hf).from_pretrained(hf.name_or_path, dtype=torch.bfloat16).to(device).eval()
    err = 0.0
    for p in ps:
        ids = torch.tensor([p], device=device)
        err = max(err, float((low(ids).logits[0, -1].float() - hf(ids).logits[0, -1].float()).abs().max()))
    del low
    return err


def _sampling(llm, ps) -> dict:
    from pdserve import SamplingParams

    def run(seed):
        params = [SamplingParams(temperature=1.0, max_tokens=8, seed=seed + i, ignore_eos=True) for i in range(len(ps))]
        return [o.token_ids for o in llm.generate(ps, params)]

    a, b, c = run(1), run(1), run(100)
    return {"sampling_t1": a[0], "same_seed_same": a == b, "other_seed_differs": a != c}


# ---- memory ------------------------------------------------------------------------------------------------
def memory(ctx: Context) -> dict:
    from pdserve.engine import loader
    from pdserve.engine.model_runner import gpu_kv_budget, kv_block_bytes, num_kv_blocks, profile_step

    if not ctx.cuda:
        return {"ok": True, "skipped": "needs CUDA (peak memory statistics)"}
    dev = ctx.device
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    loaded = loader.load(str(ctx.model_dir("medium")), torch.bfloat16, dev, None)
    peak = torch.cuda.max_memory_allocated(dev) - base
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    config = EngineConfig(device=str(dev), dtype="bfloat16")
    max_len = loaded.info.max_model_len
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    profile_step(loaded.model, config, max_len, dev)
    activations = torch.cuda.max_memory_allocated(dev) - before
    per_block = kv_block_bytes(loaded.model, config.block_size, torch.bfloat16)
    expected = gpu_kv_budget(total, free, activations, config.gpu_memory_utilization) // per_block
    blocks = num_kv_blocks(config, loaded.model, max_len, dev)
    return {
        "ok": peak <= 1.1 * weights and abs(blocks - expected) <= max(2, expected // 100),
        "rows": [
            {"what": "load peak / weight bytes", "value": round(peak / weights, 4), "weights_gib": weights / 2**30},
            {"what": "kv blocks (engine) / expected", "value": f"{blocks} / {expected}", "weights_gib": None},
        ],
        "activation_peak_gib": activations / 2**30,
        "free_after_load_gib": free / 2**30,
        "total_gib": total / 2**30,
    }


# ---- kernels -----------------------------------------------------------------------------------------------
class _Req:
    def __init__(self, total, computed, blocks):
        self.all_token_ids, self.num_computed_tokens, self.block_ids = [0] * total, computed, blocks
        self.num_tokens = total


def random_paged_case(kind: str, hq: int, hkv: int, d: int, page: int, dtype, device, seed: int = 0):
    """(step inputs, q, k, v, cache): sequences laid out on shuffled pages of a cache full of random values."""
    rng = np.random.default_rng(seed)
    shapes = {
        "prefill_cached": [(int(rng.integers(1, 300)), int(rng.integers(2, 200))) for _ in range(4)],
        "decode": [(int(rng.integers(1, 2000)), 1) for _ in range(16)],
        "mixed": [(int(rng.integers(0, 500)), int(rng.integers(1, 100))) for _ in range(8)],
    }[kind]
    pages = [-(-(c + q) // page) for c, q in shapes]
    order = rng.permutation(sum(pages) + 3).tolist()
    reqs, at = [], 0
    for (c, q), n in zip(shapes, pages):
        reqs.append(_Req(c + q, c, order[at : at + n]))
        at += n
    step = StepInputBuilder(device, page).build(reqs, [q for _, q in shapes])
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(q for _, q in shapes)
    q, k, v = (torch.randn(total, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    cache = torch.randn(len(order), 2, page, hkv, d, generator=g).to(device, dtype)
    return step, q, k, v, cache


def kernels(ctx: Context) -> dict:
    heads = [(8, 2, 32), (4, 1, 16)] if ctx.smoke else [(32, 8, 128), (32, 1, 128), (16, 16, 128)]
    dtypes = [torch.float32] if not ctx.cuda else [torch.bfloat16, torch.float16]
    names = ["torch"] + (["flashinfer"] if ctx.cuda and has("flashinfer") else [])
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
    rows, ok = [], True
    for dtype in dtypes:
        for hq, hkv, d in heads:
            spec = _Heads(hq, hkv, d)
            backends = {n: get_backend(n, ctx.device, spec, dtype, 16) for n in ["flashinfer_reference", *names]}
            for kind in ("prefill_cached", "decode", "mixed"):
                step, q, k, v, cache = random_paged_case(kind, hq, hkv, d, 16, dtype, ctx.device)
                out = {}
                for n, b in backends.items():
                    kv = cache.clone()
                    out[n] = b.forward(q, k, v, kv, b.prepare(step.attention, ctx.device), d**-0.5).float()
                row = {"dtype": str(dtype).removeprefix("torch."), "heads": f"{hq}/{hkv}x{d}", "batch": kind}
                for n in names:
                    err = float((out[n] - out["flashinfer_reference"]).abs().max())
                    row[f"{n}_err"] = err
                    ok &= err <= tol[dtype]
                rows.append(row)
    result = {"ok": ok, "rows": rows, "tolerance": {str(k): v for k, v in tol.items()}}
    if "flashinfer" not in names:
        result["flashinfer"] = "not run: needs CUDA and the flashinfer package"
    return result


@dataclass
class _Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


# ---- graphs ------------------------------------------------------------------------------------------------
def graphs(ctx: Context) -> dict:
    from pdserve import LLM, SamplingParams

    fast = ctx.cuda and has("flashinfer")
    backend = "flashinfer" if fast else "flashinfer_reference"
    model_dir = ctx.model_dir()
    llms = {
        g: LLM(model=str(model_dir), dtype="bfloat16" if ctx.cuda else "float32", device=str(ctx.device),
               num_kv_blocks=1024, attention_backend=backend, cuda_graphs=g, max_num_seqs=32)
        for g in (False, True)
    }  # fmt: skip
    ps = prompts(2048, [37] * 8, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = {g: [o.token_ids for o in llm.generate(ps, greedy)] for g, llm in llms.items()}
    rows = []
    for batch in (1, 8, 32) if not ctx.smoke else (1, 4):
        row = {"batch": batch}
        for g, llm in llms.items():
            row["graphs_ms" if g else "eager_ms"] = _decode_step_ms(llm, batch, 8 if ctx.smoke else 32)
        row["eager/graphs"] = row["eager_ms"] / row["graphs_ms"]
        rows.append(row)
    runner = llms[True].engine.runner
    return {
        "ok": tokens[True] == tokens[False] and runner.graphs is not None and runner.graphs.num_steps > 0,
        "rows": rows,
        "backend": backend,
        "captured": bool(runner.graphs and runner.graphs.num_replays),
    }


def _decode_step_ms(llm, batch: int, steps: int) -> float:
    """(generate with 1 + steps tokens - generate with 1) / steps: a decode step at this batch size."""
    from pdserve import SamplingParams

    ps = prompts(2048, [64] * batch, seed=batch)

    def timed(n):
        t = time.perf_counter()
        llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    timed(2)
    return (timed(1 + steps) - timed(1)) / steps * 1e3


# ---- nixl --------------------------------------------------------------------------------------------------
def nixl(ctx: Context) -> dict:
    from pdserve.kv import TransferState, make_transport
    from pdserve.protocol import KVLayout

    if not has("nixl"):
        return {"ok": True, "skipped": "the nixl package is not installed (carry the nixl-cu13 wheel)"}
    shape, n = (4, 2, 16, 8, 128), 64
    caches = [torch.randn((n, *shape), device=ctx.device, dtype=torch.bfloat16) for _ in range(2)]
    block = caches[0][0].numel() * 2
    layout = KVLayout(model_id="x", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=8, head_dim=128,
                      num_blocks=n, block_bytes=block, device_type=ctx.device.type)  # fmt: skip
    sender, receiver = (make_transport("nixl", f"gpu-check-{i}", c, layout) for i, c in enumerate(caches))
    try:
        receiver.add_peer(sender.peer_info())
        src, dst = list(range(0, 48)), list(range(10, 58))
        t = time.perf_counter()
        handle = receiver.start_pull(sender.name, src, dst)
        while (state := receiver.poll(handle)) is TransferState.PENDING:
            pass
        seconds = time.perf_counter() - t
        exact = bool(torch.equal(caches[1][dst], caches[0][src]))
        return {
            "ok": state is TransferState.DONE and exact,
            "state": state.name,
            "exact_bytes": exact,
            "memory": sender.peer_info().memory,
            "gb_per_s": len(src) * block / seconds / 1e9,
        }
    finally:
        receiver.close()
        sender.close()


# ---- roofline ----------------------------------------------------------------------------------------------
def roofline(ctx: Context) -> dict:
    from bench.gpu_roofline import run

    return run(ctx)
