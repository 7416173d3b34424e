"""The import layering from STYLE.md: engine/ and kv/ import neither Ray nor FastAPI; scheduler/, api/ and
the engine-client seam import no torch; workers/ do not import the HTTP layer."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pdserve"

RULES = {
    "engine": {"ray", "fastapi", "starlette", "uvicorn", "pdserve.workers", "pdserve.api", "pdserve.scheduler"},
    "kv": {"ray", "fastapi", "starlette", "uvicorn", "pdserve.workers", "pdserve.api", "pdserve.scheduler"},
    "scheduler": {"torch", "ray", "fastapi", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.api"},
    "api": {"torch", "ray", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.scheduler", "pdserve.cluster"},
    "autoscale": {"torch", "ray", "fastapi", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.api"},
    "handoff": {
        "fastapi",
        "starlette",
        "uvicorn",
        "pdserve.api",
        "pdserve.cluster",
        "pdserve.controller",
        "pdserve.workers",
    },
    "workers": {"fastapi", "starlette", "uvicorn", "pdserve.api", "pdserve.cluster", "pdserve.controller"},
    "cluster": {"torch", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.controller"},
    # the simulator (and `pdserve plan`) drives the real router and autoscaling policy, nothing that runs
    "sim": {
        "torch",
        "ray",
        "fastapi",
        "pdserve.engine",
        "pdserve.kv",
        "pdserve.workers",
        "pdserve.api",
        "pdserve.cluster",
        "pdserve.controller",
        "pdserve.handoff",
    },
    "controller": {"torch", "fastapi", "uvicorn", "pdserve.engine", "pdserve.kv", "pdserve.workers.worker"},
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_layering(package):
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for name in imports(path):
            if any(name == f or name.startswith(f + ".") for f in RULES[package]):
                bad.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_engine_client_seam_and_protocol_import_no_torch():
    for module in ("engine_client.py", "protocol.py", "hashing.py", "model_info.py"):
        assert not {n for n in imports(PKG / module) if n.split(".")[0] in ("torch", "ray", "fastapi")}, module
