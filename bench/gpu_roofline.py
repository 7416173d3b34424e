"""gpu_check's roofline: a random model with Llama-3-8B's shapes in bf16, built on the device, stepped by the
engine's ModelRunner. Decode step time beside (weight bytes + KV bytes read) / copy bandwidth; prefill
tokens/s beside the matmul TFLOP/s; each measured in this run, for torch and flashinfer, graphs off and on."""

from __future__ import annotations

import time

import torch

from pdserve.config import EngineConfig
from pdserve.engine.model_runner import ModelRunner, kv_block_bytes
from pdserve.engine.models import build_model

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192 + 64,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512,
)  # fmt: skip
BLOCK = 16


class _Req:
    def __init__(self, total: int, computed: int, blocks: list[int]) -> None:
        self.all_token_ids, self.num_computed_tokens, self.block_ids = [1] * total, computed, blocks
        self.num_tokens = total


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, reps: int, *args) -> float:
    fn(*args)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    _sync(dev)
    return (time.perf_counter() - t) / reps


def copy_bandwidth(dev, nbytes: int) -> float:
    """Device-to-device copy: bytes read + bytes written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / _timed(lambda: dst.copy_(src), dev, 10)


def matmul_flops(dev, n: int, dtype) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / _timed(lambda: a @ b, dev, 10)


def build(ctx):
    from transformers import LlamaConfig

    shapes = TINY if ctx.smoke else LLAMA3_8B
    config = LlamaConfig(**shapes, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = build_model(config, dtype, ctx.device, shapes["max_position_embeddings"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model, dtype, shapes["max_position_embeddings"]


def run(ctx) -> dict:
    from bench.gpu_sections import has

    dev, smoke = ctx.device, ctx.smoke
    model, dtype, max_len = build(ctx)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    per_token = kv_block_bytes(model, BLOCK, dtype) // BLOCK
    bw = copy_bandwidth(dev, (1 << 20) if smoke else (2 << 30))
    flops = matmul_flops(dev, 256 if smoke else 8192, dtype)
    contexts, batches = ((64, 256), (1, 2)) if smoke else ((1024, 8192), (1, 8, 32, 128))
    budget = (2 << 20) if smoke else (40 << 30)  # KV bytes for the largest batch x context that is run
    cases = [(b, c) for c in contexts for b in batches if b * c * per_token <= budget]
    skipped = [f"batch {b} x {c}" for c in contexts for b in batches if (b, c) not in cases]
    num_blocks = max(b * -(-c // BLOCK) for b, c in cases) + 1
    combos = [("torch", False)]
    if ctx.cuda and has("flashinfer"):
        combos += [("flashinfer", False), ("flashinfer", True)]
    rows, prefill = [], {}
    for backend, graphs in combos:
        config = EngineConfig(
            device=str(dev), dtype="bfloat16" if ctx.cuda else "float32", block_size=BLOCK, max_num_seqs=max(batches),
            max_num_batched_tokens=8192, attention_backend=backend, cuda_graphs=graphs,
        )  # fmt: skip
        runner = ModelRunner(model, config, num_blocks, dev, max_len)
        name = f"{backend}{'+graphs' if graphs else ''}"
        for b, c in cases:
            reqs = [_Req(c, c - 1, list(range(i * -(-c // BLOCK), (i + 1) * -(-c // BLOCK)))) for i in range(b)]
            step = _timed(runner.execute, dev, 3 if smoke else 10, reqs, [1] * b)
            roof = (weights + b * c * per_token) / bw
            rows.append({"backend": name, "batch": b, "context": c, "step_ms": step * 1e3, "roofline_ms": roof * 1e3,
                         "step/roofline": step / roof})  # fmt: skip
        n = 256 if smoke else 8192
        per_seq = n // 2 // BLOCK + 1
        reqs = [_Req(n // 2, 0, list(range(i * per_seq, (i + 1) * per_seq))) for i in (0, 1)]
        seconds = _timed(runner.execute, dev, 2 if smoke else 3, reqs, [n // 2, n // 2])
        prefill[name] = {"tokens_per_s": n / seconds, "model_tflops": n / seconds * 2 * params / 1e12}
        del runner
        if ctx.cuda:
            torch.cuda.empty_cache()
    return {
        "ok": True,
        "rows": rows,
        "prefill": prefill,
        "matmul_tflops": flops / 1e12,
        "copy_gb_per_s": bw / 1e9,
        "weight_gib": weights / 2**30,
        "kv_bytes_per_token": per_token,
        "skipped_cases": skipped,
    }
