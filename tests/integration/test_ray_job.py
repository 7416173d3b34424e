"""`ray job submit` deploys `pdserve serve` on a `ray start --head` cluster on loopback, and it answers.

The head runs as our own child (`ray start --block`, its own process group) and is stopped by that group's
id, so nothing else on the machine is touched.
"""

import json
import os
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
    gcs, dash, serve, agent = free_port(), free_port(), free_port(), free_port()
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
            f"--dashboard-agent-listen-port={agent}",  # not the default 52365: another Ray may hold it
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
        yield f"http://127.0.0.1:{dash}", serve, token, f"127.0.0.1:{gcs}"
    finally:
        # SIGTERM to `ray start` alone: it drains the node through the GCS and stops its children (2 s). Sent to
        # the whole group, the GCS dies first and the drain waits 30 s for it. Whatever is left then is killed.
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def submit(token, address, *args):
    runtime_env = json.dumps({"excludes": [".venv", ".git", "bench/results", "*.egg-info"]})
    for _attempt in range(6):  # the dashboard answers before its job agent is ready, more so under load
        job = run(token, str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                  "--runtime-env-json", runtime_env, "--", *args, timeout=300)  # fmt: skip
        if "No available agent" not in job.stdout + job.stderr:  # it ran (and maybe failed): no retry
            return job
        time.sleep(10)
    return job


def complete(port: int) -> dict:
    body = json.dumps({"model": "pdserve-demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def named_actors(token, gcs) -> list[str]:
    code = (
        f"import json, ray; ray.init(address='{gcs}', logging_level='ERROR'); "
        "print(json.dumps(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True))))"
    )
    out = run(token, sys.executable, "-c", code, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ray_job_submit_detach_status_refuse_shutdown(head):
    address, port, token, gcs = head
    metrics = free_port()
    serve = ["pdserve", "serve", "--address", "auto", "--detach", "--name", "jobtest", "--host", "127.0.0.1",
             "--port", str(port), "--num-kv-blocks", "128", "--controller.metrics-port", str(metrics)]  # fmt: skip
    job = submit(token, address, *serve)
    assert job.returncode == 0 and "pdserve ready" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
    try:
        reply = complete(port)  # the job has ended; the service it deployed answers
        assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] == 8
        status = run(token, str(BIN / "pdserve"), "status", "--address", gcs, "--name", "jobtest", "--json",
                     timeout=120)  # fmt: skip
        assert status.returncode == 0, status.stderr[-2000:]
        st = json.loads(status.stdout)
        assert sorted((w["role"], w["state"]) for w in st["workers"]) == [("decode", "ready"), ("prefill", "ready")]
        assert all(w["pid"] > 0 for w in st["workers"]) and st["frontends"][0]["state"] == "ready"
        again = submit(token, address, *serve)  # the same name twice: refused, the first keeps serving
        assert again.returncode != 0 and "already runs" in again.stdout + again.stderr, again.stdout[-2000:]
        assert complete(port)["usage"]["completion_tokens"] == 8
        gone = run(token, str(BIN / "pdserve"), "migrate", "cmpl-nothing", "--address", gcs, "--name", "jobtest",
                   timeout=120)  # fmt: skip
        assert gone.returncode == 2 and "is not running on any decode" in gone.stderr, gone.stderr[-2000:]
    finally:
        down = run(token, str(BIN / "pdserve"), "shutdown", "--address", gcs, "--name", "jobtest", timeout=180)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    assert [n for n in named_actors(token, gcs) if n.startswith("jobtest.")] == []
