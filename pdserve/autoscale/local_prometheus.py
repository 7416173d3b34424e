"""A local Prometheus for `pdserve serve --autoscale` without `--prometheus-url` (and for tests): the
`prometheus` binary from PATH running `deploy/prometheus.yml` and its rules, pointed at the deployment's
frontends and controller, on a free port with a temporary data directory; stopped by its handle."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "rules" / "pdserve.rules.yml"
INSTALL_HINT = (
    "install it (Debian/Ubuntu: 'apt-get install prometheus'; or a release from https://prometheus.io/download) "
    "or point pdserve at a running one with --prometheus-url URL"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(targets: list[str], interval_s: float, deployment: str = "pdserve") -> dict:
    """deploy/prometheus.yml with these targets (labelled with the deployment's name), this scrape and
    evaluation interval, and the rules beside it."""
    config = yaml.safe_load(CONFIG.read_text())
    every = f"{interval_s:g}s"
    config["global"].update(scrape_interval=every, evaluation_interval=every)
    config["rule_files"] = ["pdserve.rules.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdserve"]
    job.update(scrape_interval=every, scrape_timeout=f"{min(interval_s, 4):g}s")
    job["static_configs"] = [{"targets": targets, "labels": {"deployment": deployment}}]
    return config


class LocalPrometheus:
    def __init__(
        self,
        targets: list[str],
        interval_s: float = 2.0,
        port: int | None = None,
        rule_window: str | None = None,
        deployment: str = "pdserve",
    ) -> None:
        """`rule_window` replaces the rules' 1m rate windows (tests compress time; the names keep "1m")."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise ValueError(f"--autoscale needs Prometheus and no 'prometheus' binary is on PATH: {INSTALL_HINT}")
        if not (RULES.is_file() and CONFIG.is_file()):
            raise ValueError(f"pdserve's Prometheus config or rules are missing in {DEPLOY}: run from a checkout")
        self.dir = Path(tempfile.mkdtemp(prefix="pdserve-prometheus-"))
        rules = RULES.read_text()
        (self.dir / "pdserve.rules.yml").write_text(rules.replace("[1m]", f"[{rule_window}]") if rule_window else rules)
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(targets, interval_s, deployment)))
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 30.0) -> LocalPrometheus:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}); see {self.dir / 'prometheus.log'}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready on {self.url} within {timeout_s} s")

    def stop(self) -> None:
        """Idempotent: stop this Prometheus (by its pid) and remove its data."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
