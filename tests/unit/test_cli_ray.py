"""How the CLI joins Ray: token auth chosen before Ray is imported, and a silent address refused at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pdserve.cli_ray import probe, use_ray_token_auth
from pdserve.live.ports import free_port


@pytest.fixture
def env(monkeypatch, tmp_path) -> dict:
    environ = {"HOME": str(tmp_path)}
    monkeypatch.setattr(os, "environ", environ)
    return environ


def test_no_token_leaves_the_mode_to_ray(env):
    use_ray_token_auth()
    assert "RAY_AUTH_MODE" not in env


@pytest.mark.parametrize("source", ["home", "path", "env"])
def test_a_token_turns_token_auth_on(env, tmp_path, source):
    if source == "home":
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    elif source == "path":
        (tmp_path / "tok").write_text("t" * 32)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "tok")
    else:
        env["RAY_AUTH_TOKEN"] = "t" * 32
    use_ray_token_auth()
    assert env["RAY_AUTH_MODE"] == "token"


def test_an_explicit_mode_is_kept(env):
    env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="t" * 32)
    use_ray_token_auth()
    assert env["RAY_AUTH_MODE"] == "disabled"


def test_parsing_any_command_imports_no_ray():
    """`main` sets RAY_AUTH_MODE after parsing: Ray reads it once, at import, so parsing must not import it."""
    code = (
        "import sys\n"
        "from pdserve.cli import build_parser\n"
        "for argv in (['serve'], ['status'], ['scale', '--decode', '1'], ['drain', 'w'], ['migrate', 'r'],"
        " ['shutdown']):\n"
        "    build_parser().parse_args(argv)\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_probe_refuses_a_closed_port_at_once():
    start = time.monotonic()
    with pytest.raises(ValueError, match="no Ray cluster answers at 127.0.0.1:"):
        probe(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5
