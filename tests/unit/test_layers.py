"""The import layering from STYLE.md: engine/ and kv/ import neither Ray nor FastAPI; router/, api/, load/
and the engine-client seam import no torch (load/, the load generator, no Ray or server either); workers/ do
not import the HTTP layer.

Two checks. RULES: what each package's own files import (read with ast). REACH: what a module may not reach
through the import graph (grimp's, over pdserve): what it imports, what those import, and so on, down to
the third-party package. Every import statement counts, those inside functions too: this codebase imports
lazily on purpose (to keep torch, Ray or NIXL out of processes that do not use them), and a lazy import on a
serving path runs all the same (`model_info.load_model_info` imported the demo model from
`pdserve.engine.models.demo`, so a frontend serving the demo model loaded torch). Imports under
`if TYPE_CHECKING:` never run and do not count. Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`
first, which grimp does not record (nor does import-linter, built on it), so each module is taken to import
its parent package here.

A lazy import that is meant to stay lazy is an exception in LAZY_OK: one edge, with the reason it never
runs on the paths checked. Only an import that no checked layer triggers belongs there (`pdserve.__getattr__`
imports the engine when `pdserve.LLM` is touched, never when a submodule is imported); an import that runs
when a checked layer calls the function holding it is a layering bug to fix, not an exception.

The graph stops at third-party packages, so a last test runs a frontend's imports and the demo model's
info in a fresh process and looks for torch in `sys.modules` (transformers' config classes import it, which
is why the demo's config is a plain `DemoConfig`).
"""

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

PKG = Path(__file__).resolve().parents[2] / "pdserve"

RULES = {
    "engine": {"ray", "fastapi", "starlette", "uvicorn", "pdserve.workers", "pdserve.api", "pdserve.router"},
    "kv": {"ray", "fastapi", "starlette", "uvicorn", "pdserve.workers", "pdserve.api", "pdserve.router"},
    "router": {"torch", "ray", "fastapi", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.api"},
    "api": {"torch", "ray", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.router", "pdserve.cluster"},
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
    # the load generator: a client process, never a serving one (and never the harness's deployments)
    "load": {
        "torch",
        "ray",
        "fastapi",
        "uvicorn",
        "pdserve.engine",
        "pdserve.kv",
        "pdserve.workers",
        "pdserve.api",
        "pdserve.router",
        "pdserve.cluster",
        "pdserve.controller",
        "pdserve.handoff",
        "pdserve.autoscale",
        "pdserve.live",
    },
    # the live-deployment harness drives deployments through their public entry points, never an engine
    "live": {"torch", "pdserve.engine", "pdserve.kv", "pdserve.workers", "pdserve.handoff"},
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
    for module in ("engine_client.py", "protocol.py", "hashing.py", "model_info.py", "demo_model.py"):
        assert not {n for n in imports(PKG / module) if n.split(".")[0] in ("torch", "ray", "fastapi")}, module


NO_TORCH = ["api", "cluster", "router", "autoscale", "sim", "config", "protocol", "hashing", "model_info"]
NO_TORCH += ["engine_client", "demo_model", "load"]
REACH = {f"pdserve.{m}": {"torch"} for m in NO_TORCH} | {
    f"pdserve.{m}": {"ray", "fastapi", "starlette", "uvicorn"} for m in ("engine", "kv")
}
REACH["pdserve.load"] = {"torch", "ray", "fastapi", "starlette", "uvicorn"}
LAZY_OK = {
    ("pdserve", "pdserve.llm"): "pdserve.__getattr__ imports the engine only when pdserve.LLM is used",
}


@pytest.fixture(scope="module")
def graph():
    g = grimp.build_graph("pdserve", include_external_packages=True, exclude_type_checking_imports=True, cache_dir=None)
    for module in list(g.modules):
        parent = module.rpartition(".")[0]
        if module.startswith("pdserve.") and parent:
            g.add_import(importer=module, imported=parent)
    for importer, imported in LAZY_OK:
        assert g.direct_import_exists(importer=importer, imported=imported), f"stale LAZY_OK: {importer} -> {imported}"
        g.remove_import(importer=importer, imported=imported)
    return g


def _hop(g, importer: str, imported: str) -> str:
    lines = ", ".join(f"l.{d['line_number']}" for d in g.get_import_details(importer=importer, imported=imported))
    return f"{importer} -> {imported} ({lines or 'its parent package, run first'})"


@pytest.mark.parametrize("source", sorted(REACH))
def test_layering_through_the_import_graph(graph, source):
    assert source in graph.modules, (
        f"{source} is not in the import graph (no such module, or a directory without __init__.py)"
    )
    bad = []
    for forbidden in sorted(REACH[source] & set(graph.modules)):
        for chain in sorted(graph.find_shortest_chains(importer=source, imported=forbidden, as_packages=True)):
            hops = "\n    ".join(_hop(graph, a, b) for a, b in zip(chain, chain[1:]))
            bad.append(f"{source} reaches {forbidden}:\n    {hops}")
    assert not bad, "\n".join(bad)


def test_a_frontend_serving_the_demo_model_loads_no_torch():
    code = (
        "import sys, pdserve.cluster.client, pdserve.api.app\n"
        "from pdserve.model_info import load_model_info\n"
        "info = load_model_info(None)\n"
        "info.encode_chat([{'role': 'user', 'content': 'hi'}])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
