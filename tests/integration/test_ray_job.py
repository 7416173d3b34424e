"""`ray job submit` deploys `pdserve serve` on a `ray start --head` cluster on loopback, and it answers.

The head runs as our own child (`ray start --block`, its own process group) and is stopped by that group's
id, so nothing else on the machine is touched.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(token: str) -> dict:
    """Ray 2.60 clusters require a token; ours is passed by environment, so nothing lands in ~/.ray."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    return env


def run(token, *args, **kw):
    return subprocess.run(args, env=ray_env(token), capture_output=True, text=True, **kw)


@pytest.fixture
def head(tmp_path):
    gcs, dash, serve = free_port(), free_port(), free_port()
    token = secrets.token_hex(32)
    temp = Path("/tmp") / f"rj{os.getpid()}"  # short: unix socket paths have a length limit
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=ray_env(token),
        start_new_session=True,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without our token): it is up
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("ray head did not start:\n" + (tmp_path / "head.log").read_text()[-3000:])
                time.sleep(1)
        yield f"http://127.0.0.1:{dash}", serve, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_deploys_and_answers(head):
    address, port, token = head
    runtime_env = json.dumps({"excludes": [".venv", ".git", "bench/results", "*.egg-info"]})
    for _attempt in range(6):  # the dashboard answers before its job agent is ready, more so under load
        submit = run(
            token,
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            runtime_env,
            "--no-wait",
            "--",
            "pdserve",
            "serve",
            "--address",
            "auto",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-kv-blocks",
            "128",
            timeout=120,
        )
        if submit.returncode == 0:
            break
        time.sleep(10)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)
    try:
        body = json.dumps({"model": "pdserve-demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
        deadline = time.time() + 180
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
                )
                reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
                break
            except OSError:
                if time.time() > deadline:
                    logs = run(token, str(BIN / "ray"), "job", "logs", "--address", address, job_id, timeout=60)
                    pytest.fail(f"the job never answered; its logs:\n{logs.stdout[-4000:]}")
                time.sleep(1)
        assert reply["object"] == "text_completion"
        assert reply["usage"]["completion_tokens"] == 8 and len(reply["choices"]) == 1
    finally:
        stop = run(token, str(BIN / "ray"), "job", "stop", "--address", address, job_id, timeout=60)
        assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
