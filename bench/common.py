"""Shared helpers for the benchmarks: a random-weight model directory, result tables and JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def build_random_llama(
    path: Path, *, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768, vocab=32000, max_positions=4096, seed=0
) -> Path:
    """A random-weight Llama checkpoint (safetensors); no tokenizer needed when prompts are token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    _write_tokenizer(path, vocab)
    return path


def _write_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer covering the vocab, so the directory is a complete HF model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v if v is not None else "")


def write_json(name: str, payload: dict) -> Path:
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    return out


def percentiles(values) -> dict:
    """p50/p90/p99/p99.9, max and mean of a sample (None for an empty one)."""
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None, "mean": None}
    p50, p90, p99, p999 = np.percentile(values, [50, 90, 99, 99.9]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "p99.9": p999, "max": max(values), "mean": float(np.mean(values))}


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of a server's /metrics: (name, sorted labels) -> value. Raises on HTTP errors."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---- a `pdserve serve` under test ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pdserve serve` in its own session (process group = its pid); stop() leaves nothing of it behind.
    The controller's /metrics (routing decisions, per-worker series) is on a free port too: `controller_url`."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, src: str | None = None, env: dict | None = None
    ) -> None:
        self.name, self.args, self.log, self.src = name, args, log_dir / f"server-{name}.log", src
        self.env = os.environ if env is None else env  # the server's environment (default: this one's)
        self.proc: subprocess.Popen | None = None
        self.controller_url: str | None = None

    def start(self, timeout: float = 300) -> str:
        port, metrics_port = free_port(), free_port()
        exe = Path(sys.executable).with_name("pdserve")
        cmd = [str(exe) if exe.exists() else "pdserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if "--controller.metrics-port" not in self.args:
            cmd += ["--controller.metrics-port", str(metrics_port)]
        else:
            metrics_port = int(self.args[self.args.index("--controller.metrics-port") + 1])
        self.controller_url = f"http://127.0.0.1:{metrics_port}"
        self.cmd = cmd + self.args
        with open(self.log, "w") as log:
            env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [self.src, self.env.get("PYTHONPATH")]))}
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.src, env=env
            )
        deadline = time.monotonic() + timeout
        while "pdserve ready on" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {self.name} did not start; log {self.log}:\n{self.tail()}")
            time.sleep(0.2)
        return f"http://127.0.0.1:{port}"

    def ray_address(self) -> str | None:
        """The GCS address of the Ray cluster this server started (its raylet says), for a driver that must
        join exactly that cluster even when other Ray clusters run on the machine (`auto` picks the newest)."""
        for pid in _session(self.proc.pid) if self.proc else {}:
            with contextlib.suppress(OSError):
                for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    if arg.startswith(b"--gcs-address="):
                        return arg.split(b"=", 1)[1].decode()
        return None

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def stop(self, timeout: float = 60) -> dict:
        """SIGTERM the server (it shuts its Ray down), SIGKILL its process group after `timeout`; then check
        that nothing it started survives. Ray puts each actor in a process group of its own but keeps the
        session, so the check is by session id (= the server's pid, a superset of its process group)."""
        if self.proc is None:
            return {}
        sid, start, forced = self.proc.pid, time.monotonic(), False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                forced = True
                os.killpg(sid, signal.SIGKILL)
                self.proc.wait()
        stop_s = time.monotonic() - start
        deadline = time.monotonic() + 15  # Ray's children exit just after the driver
        while (left := _session(sid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1 if left else 0)
        code, self.proc = self.proc.returncode, None
        strays = [f"{pid} {name}" for pid, name in left.items()]
        return {
            "exit_code": code,
            "stop_s": stop_s,
            "sigkill": forced,
            "strays_killed": strays,
            "strays": _session(sid),
        }


def _session(sid: int) -> dict[int, str]:
    """Live processes of session `sid`: pid -> name."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(d.name)) == sid and "Z" not in (d / "stat").read_text().split(")")[-1][:3]:
                    out[int(d.name)] = (d / "comm").read_text().strip()
    return out
