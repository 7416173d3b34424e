"""`pdserve serve` as a subprocess: free ports for its frontend and its controller's /metrics, its own local Ray,
ready once its log says so, and stopped by its session id, so nothing it started (Ray's processes included)
survives `stop()`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pdserve.live.ports import free_port


class Server:
    """`pdserve serve ARGS` in its own session (process group = its pid). `start()` returns the frontend's URL;
    the controller's /metrics (routing decisions, per-worker series) is `controller_url`. `src`: another source
    tree to serve (a worktree of an older commit), put first on its PYTHONPATH and used as its cwd."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, src: str | None = None, env: dict | None = None
    ) -> None:
        self.name, self.args, self.log, self.src = name, args, Path(log_dir) / f"server-{name}.log", src
        self.env = os.environ if env is None else env  # the server's environment (default: this one's)
        self.proc: subprocess.Popen | None = None
        self.controller_url: str | None = None
        self.url: str | None = None
        self.cmd: list[str] = []

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
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def ray_address(self) -> str | None:
        """The GCS address of the Ray cluster this server started (its raylet says), for a driver that must
        join exactly that cluster even when other Ray clusters run on the machine (`auto` picks the newest)."""
        for pid in session(self.proc.pid) if self.proc else {}:
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
        session, so the check is by session id (= the server's pid, a superset of its process group).
        Idempotent: a second call returns {}."""
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
        while (left := session(sid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1 if left else 0)
        code, self.proc = self.proc.returncode, None
        strays = [f"{pid} {name}" for pid, name in left.items()]
        return {"exit_code": code, "stop_s": stop_s, "sigkill": forced, "strays_killed": strays,
                "strays": session(sid)}  # fmt: skip

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def session(sid: int) -> dict[int, str]:
    """Live processes of session `sid`: pid -> name."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(d.name)) == sid and "Z" not in (d / "stat").read_text().split(")")[-1][:3]:
                    out[int(d.name)] = (d / "comm").read_text().strip()
    return out
