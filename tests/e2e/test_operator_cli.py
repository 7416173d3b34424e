"""Operator commands as a user runs them: a foreground `pdserve serve`, then status, scale, drain and shutdown
from other shells, every process with a new shell's environment (no RAY_* or PDSERVE_* variable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pdserve.live.ports import free_port
from pdserve.live.server import Server

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
ERROR_WITHIN_S = 15.0  # a refused operator command's bound: Ray's import and a probe, no retry loop


def shell_env(home: Path) -> dict:
    """What a new login shell has; its own HOME, so the Ray token is the one the serve below creates."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in ("USER", "LOGNAME", "TMPDIR") if k in os.environ})
    return env


def pdserve(env: dict, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "pdserve"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def ok(env: dict, *args: str) -> str:
    proc, _ = pdserve(env, *args)
    assert proc.returncode == 0, f"pdserve {' '.join(args)}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "InvalidAuthToken" not in proc.stderr, proc.stderr
    return proc.stdout


def refused(env: dict, *args: str) -> str:
    """The command fails fast: exit 2, nothing on stdout, one `pdserve: error:` line on stderr."""
    proc, elapsed = pdserve(env, *args, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert elapsed < ERROR_WITHIN_S, f"pdserve {' '.join(args)} took {elapsed:.1f}s to fail"
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("pdserve: error: "), proc.stderr
    return proc.stderr


def ready(st: dict, role: str) -> list[str]:
    return sorted(w["worker_id"] for w in st["workers"] if w["role"] == role and w["state"] == "ready")


def test_status_of_an_address_nothing_answers_fails_fast(tmp_path):
    err = refused(shell_env(tmp_path), "status", "--address", f"127.0.0.1:{free_port()}")
    assert "no Ray cluster answers" in err


@pytest.mark.ray
@pytest.mark.slow
def test_operator_commands_from_a_fresh_shell(tmp_path):
    env, name = shell_env(tmp_path), f"ops{uuid.uuid4().hex[:6]}"
    args = ["--name", name, "--prefill-workers", "1", "--decode-workers", "1", "--controller.metrics-port", "0"]
    server = Server(name, args, tmp_path, env=env)
    stopped = None
    try:
        server.start(timeout=240)
        # explicit, as `auto` refuses to choose when other tests' Ray clusters run on this machine too
        ops = ["--name", name, "--address", server.ray_address()]
        st = json.loads(ok(env, "status", "--json", *ops))
        assert st["name"] == name and len(ready(st, "prefill")) == 1 and len(ready(st, "decode")) == 1
        before = set(ready(st, "decode"))

        assert "targets now" in ok(env, "scale", "--decode", "2", *ops)
        deadline = time.monotonic() + 180
        while len(ready(st := json.loads(ok(env, "status", "--json", *ops)), "decode")) < 2:
            assert time.monotonic() < deadline, f"no second decode worker: {st['workers']}"
            time.sleep(1)
        assert st["targets"]["decode"] == 2
        (added,) = set(ready(st, "decode")) - before

        assert "drained and stopped" in ok(env, "drain", added, *ops)
        st = json.loads(ok(env, "status", "--json", *ops))
        assert ready(st, "decode") == sorted(before) and st["targets"]["decode"] == 1

        assert "no pdserve deployment named 'nope'" in refused(env, "status", "--name", "nope", *ops[2:])
        assert "no live worker" in refused(env, "drain", "decode-nope", *ops)

        assert "shut down; no named actor of it is left" in ok(env, "shutdown", *ops)
        code = server.proc.wait(timeout=60)  # the foreground serve sees it and exits by itself
        log = server.log.read_text()
        assert code == 0, server.tail()
        assert f"deployment {name} was shut down from elsewhere" in log
        assert "controller shutdown failed" not in log and "Traceback" not in log, server.tail(40)
    finally:
        stopped = server.stop()
    assert not stopped["strays_killed"], f"the serve left its Ray running: {stopped}"
