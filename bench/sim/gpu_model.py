"""Derived (not measured) latency model of one H100 SXM serving a Llama-3-8B-shaped model in bf16.

Every coefficient is a roofline estimate from the numbers below; `python -m bench.sim.gpu_model` writes
them with their sources to pdserve/sim/calibration_h100.json.
"""

from __future__ import annotations

import json

from pdserve.sim.model import CALIBRATIONS

ASSUMPTIONS = {
    "params": (8.03e9, "Llama-3-8B parameter count (Meta model card)"),
    "num_layers": (32, "Llama-3-8B config"),
    "num_heads": (32, "Llama-3-8B config (query heads)"),
    "num_kv_heads": (8, "Llama-3-8B config (GQA)"),
    "head_dim": (128, "Llama-3-8B config"),
    "dtype_bytes": (2, "bf16 weights and KV cache"),
    "peak_flops": (989.4e12, "H100 SXM5 dense bf16 tensor-core peak (NVIDIA H100 datasheet)"),
    "peak_hbm_bytes_per_s": (3.35e12, "H100 SXM5 HBM3 bandwidth (NVIDIA H100 datasheet)"),
    "hbm_bytes": (80e9, "H100 SXM5 80 GB"),
    "prefill_mfu": (0.5, "assumption: achieved fraction of peak for large prefill GEMMs"),
    "attention_mfu": (0.5, "assumption: achieved fraction of peak for FlashAttention-style prefill attention"),
    "hbm_efficiency": (0.8, "assumption: achieved fraction of HBM bandwidth for decode weight and KV reads"),
    "decode_framework_overhead_s": (0.001, "assumption: scheduling, sampling, launch per decode step"),
    "non_kv_reserved_bytes": (14e9, "assumption: activations, CUDA graphs, comm buffers, fragmentation"),
    "transfer_bytes_per_s": (25e9, "assumption: half the 50 GB/s line rate of one 400 Gb/s NIC per GPU (RDMA)"),
    "transfer_overhead_s": (0.002, "assumption: handoff setup (reserve, descriptors, confirm) per request"),
    "max_num_batched_tokens": (8192, "assumption: chunked-prefill token budget per step"),
}
PROVENANCE = (
    "derived: a roofline model of one H100 SXM5 (datasheet bf16 peak FLOP/s and HBM bandwidth, assumed "
    "efficiencies) serving a Llama-3-8B-shaped model in bf16, not a measurement; written by "
    "`python -m bench.sim.gpu_model`"
)


def derive() -> dict:
    v = {k: val for k, (val, _) in ASSUMPTIONS.items()}
    flops_per_token = 2 * v["params"]
    weight_bytes = v["dtype_bytes"] * v["params"]
    kv_bytes_per_token = 2 * v["num_layers"] * v["num_kv_heads"] * v["head_dim"] * v["dtype_bytes"]
    attn_flops_per_pair = 4 * v["num_layers"] * v["num_heads"] * v["head_dim"]  # QK^T and PV, 2 FLOPs per MAC
    prefill_rate = v["prefill_mfu"] * v["peak_flops"]
    attn_rate = v["attention_mfu"] * v["peak_flops"]
    hbm_rate = v["hbm_efficiency"] * v["peak_hbm_bytes_per_s"]
    weight_read_s = weight_bytes / hbm_rate
    kv_bytes = v["hbm_bytes"] - weight_bytes - v["non_kv_reserved_bytes"]
    return {
        "name": "h100",
        "kind": "derived",
        "source": "roofline estimate from stated assumptions (bench/sim/gpu_model.py); not a measurement",
        "provenance": PROVENANCE,
        "assumptions": {k: {"value": val, "source": src} for k, (val, src) in ASSUMPTIONS.items()},
        "prefill": {
            "a": weight_read_s,
            "b": flops_per_token / prefill_rate,
            "c": attn_flops_per_pair / 2 / attn_rate,
            "d": attn_flops_per_pair / attn_rate,
        },
        "prefill_derivation": "step(n, s) = a + b*n + c*n^2 + d*n*s for n new tokens after s cached ones: a = one "
        "read of the weights (a step is never faster), b = 2*params FLOPs / (prefill_mfu*peak), attention costs "
        "4*layers*heads*head_dim FLOPs per (query, key) pair: n*s pairs against the cache (d), n^2/2 causal (c)",
        "decode": {
            "a": weight_read_s + v["decode_framework_overhead_s"],
            "b": kv_bytes_per_token / hbm_rate,
            "c": flops_per_token / prefill_rate,
        },
        "decode_derivation": "step(B, C) = a + b*C + c*B: a = weights read at hbm_efficiency plus framework "
        "overhead, b = KV bytes per context token at hbm_efficiency, c = one token's 2*params FLOPs at "
        "prefill_mfu, charged in full (conservative: part of it overlaps the weight read)",
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_capacity_tokens": int(kv_bytes // kv_bytes_per_token),
        "kv_capacity_source": f"{kv_bytes / 1e9:.1f} GB for KV = HBM - weights - non_kv_reserved",
        "max_num_batched_tokens": v["max_num_batched_tokens"],
        "transfer_bytes_per_s": v["transfer_bytes_per_s"],
        "transfer_overhead_s": v["transfer_overhead_s"],
        "transfer_source": ASSUMPTIONS["transfer_bytes_per_s"][1],
    }


def main() -> None:
    out = derive()
    path = CALIBRATIONS["h100"]
    path.write_text(json.dumps(out, indent=2) + "\n")
    p, d = out["prefill"], out["decode"]
    print(f"prefill step = {p['a']:.3g} + {p['b']:.3g}*n + {p['c']:.3g}*n^2 + {p['d']:.3g}*n*s")
    print(f"decode step  = {d['a']:.3g} + {d['b']:.3g}*C + {d['c']:.3g}*B")
    print(f"KV: {out['kv_bytes_per_token']} bytes/token, {out['kv_capacity_tokens']} tokens per GPU; wrote {path}")


if __name__ == "__main__":
    main()
