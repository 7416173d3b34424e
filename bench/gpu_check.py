"""The prepared single-GPU check of the engine: no Ray, no network, random-weight models built in place.

    python bench/gpu_check.py OUT_DIR [--sections parity,sampling,...] [--smoke] [--device cuda]

Sections (each is timed, and a failure in one is recorded and the next still runs; the JSON is rewritten after
every section, so a run cut short keeps what it measured):
  env       device, versions, which optional packages are importable
  parity    bf16 greedy against float32 over the parity prompts (first divergence and the float32 top-1 gap
            there: a divergence counts as noise only where that gap is below bf16's logit error), float32 against
            transformers, and sampling at temperature 1 (same seed twice: same tokens; another seed: others)
  memory    peak memory while loading bf16 weights against their bytes; KV blocks against
            (utilization x total - in use after load - the profile step's activations) / block bytes
  kernels   flashinfer vs flashinfer_reference vs torch on random paged batches (prefill on a cached prefix,
            decode, mixed, GQA incl. 1 KV head): max abs error per dtype
  graphs    CUDA graphs on and off (flashinfer): the same greedy tokens, and the decode step time at batch 1, 8, 32
  nixl      a NIXL pull between two VRAM caches in this process, bytes compared (when nixl is importable)
  roofline  a random Llama-3-8B-shaped model in bf16: decode step time at batch 1/8/32/128 with 1k and 8k tokens
            of context beside (weight bytes + KV bytes read) / the copy bandwidth measured here; prefill tokens/s
            beside the dense bf16 matmul TFLOP/s measured here; flashinfer against torch, graphs on against off

`--smoke` shrinks every shape so the whole script runs on CPU in seconds (what `make test` runs, so the
script cannot rot); CUDA-only parts then report "skipped". FlashInfer compiles its kernels on first use for
the device's arch only (FLASHINFER_CUDA_ARCH_LIST) into $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEEDED = ("msgspec", "pydantic", "pydantic_settings", "safetensors", "transformers", "numpy")
_missing = [m for m in NEEDED if __import__("importlib.util").util.find_spec(m) is None]
if _missing:  # before importing pdserve, so a bare device image says what to carry
    raise SystemExit(
        f"gpu_check needs {', '.join(_missing)}: carry their wheels (bench/gpu_wheels.sh) and "
        "pip install --no-deps --no-index wheels/*.whl"
    )

from bench import gpu_sections as sections  # noqa: E402

ORDER = ["env", "parity", "memory", "kernels", "graphs", "nixl", "roofline"]


def set_flashinfer_env(device: torch.device) -> None:
    """Compile only for this device's arch; keep the kernels where a later run can find them."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", f"{major}.{minor}{'a' if major >= 9 else ''}")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--sections", default=",".join(ORDER))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    set_flashinfer_env(device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "gpu_check.json"
    report: dict = {"device": str(device), "smoke": args.smoke, "sections": {}}
    work = Path(tempfile.mkdtemp(prefix="pdserve-gpu-check-"))
    ctx = sections.Context(device=device, smoke=args.smoke, work=work)
    for name in args.sections.split(","):
        if name not in ORDER:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(ORDER)}")
        start = time.perf_counter()
        try:
            result = getattr(sections, name)(ctx)
        except Exception as e:  # recorded, and the next section still runs
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        report["sections"][name] = result
        out.write_text(json.dumps(report, indent=2, default=str))
        print_section(name, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {out}")
    return report


def print_section(name: str, result: dict) -> None:
    status = "skipped" if result.get("skipped") else ("ok" if result.get("ok") else "FAILED")
    print(f"\n== {name}: {status} ({result['seconds']} s) {result.get('skipped') or result.get('error') or ''}")
    rows = result.get("rows") or []
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
        print("  ".join(c.ljust(width[c]) for c in cols))
        for r in rows:
            print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))
    for k, v in result.items():
        if k not in ("rows", "ok", "seconds", "traceback", "error", "skipped"):
            print(f"  {k}: {_fmt(v)}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


if __name__ == "__main__":
    main()
