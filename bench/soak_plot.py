"""The soak run's PNG: RSS per process, held KV blocks per worker and the controller's prefix index over time,
each with its fitted trend after the warm-up. Re-plot a saved run:

    python bench/soak_plot.py bench/results/soak.json bench/results/soak.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(result: dict, path: Path) -> bool:
    """False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = [s for s in result["samples"] if not s.get("drained")]
    warmup_s = result["args"]["warmup_s"]
    fits = {
        "rss_mb": {r["process"]: r for r in result.get("rss", [])},
        "held_blocks": {r["worker"]: r for r in result.get("held", [])},
        "index_blocks": {r["worker"]: r for r in result.get("held", [])},
    }
    fig, (rss, held, index) = plt.subplots(3, 1, figsize=(11, 10), sharex=True, height_ratios=[3, 2, 1])
    panels = [
        (rss, "rss_mb", lambda s, n: s["rss_mb"].get(n), "RSS (MB)"),
        (held, "held_blocks", lambda s, n: s["held_blocks"].get(n), "held KV blocks"),
        (index, "index_blocks", lambda s, n: s["index_blocks"], "prefix index (blocks)"),
    ]
    for ax, field, value, label in panels:
        names = (
            ["controller index"]
            if field == "index_blocks"
            else list(dict.fromkeys(n for s in samples for n in s[field]))
        )
        for name in names:
            pts = [(s["t"] / 60, value(s, name)) for s in samples if value(s, name) is not None]
            if not pts:
                continue
            (line,) = ax.plot(*zip(*pts), lw=1, marker=".", ms=3, label=name)
            fit = fits[field].get(name, {})
            if fit.get("slope_h") is not None:
                ends = [max(warmup_s / 60, pts[0][0]), pts[-1][0]]
                ax.plot(ends, [fit["intercept"] + fit["slope_h"] * t / 60 for t in ends], ls="--", lw=0.8,
                        color=line.get_color())  # fmt: skip
        ax.axvline(warmup_s / 60, color="grey", lw=0.6, ls=":")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=4)
    a = result["args"]
    rss.set_title(f"soak: {a['prefill']}P{a['decode']}D, {a['concurrency']} clients, {a['cancel_share']:.0%} of "
                  f"streams cancelled; dashed: least-squares trend after the warm-up (dotted)")  # fmt: skip
    index.set_xlabel("minutes since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "soak.json")
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    print(f"wrote {out}" if plot(json.loads(src.read_text()), out) else "matplotlib is not installed")
