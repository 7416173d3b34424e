"""Put each historic handoff race back, one at a time, into a copy of this tree and run the handoff state
machine (tests/unit/test_handoff_machine.py) on it: each must fail. Not a test itself (it takes minutes: a
failure is shrunk); run `python -m tests.put_back_races` from the repository root. Prints one line per race
and the first lines of the failure; exits 1 if the machine misses one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# commit that fixed it: (file, the fixed code, the race put back)
RACES = {
    "7a55808 decode: a client abort frees an import's reservation at once, between reserve and pull": (
        "pdserve/handoff/receiver.py",
        "        rec = self.imports.get(request_id)\n        if rec is None:\n            return False\n"
        "        rec.aborted = True\n        return True",
        "        return False  # the engine aborts it now",
    ),
    "7a55808 prefill: a client abort frees held blocks the decode worker may be reading": (
        "pdserve/handoff/sender.py",
        "            elif lease.holds_request:\n                lease.aborted = True\n                return True",
        "            elif lease.holds_request:\n                return False  # the engine aborts it now",
    ),
    "88f87da: a drop during a stage's reserve frees the list before the reserve adds to it": (
        "pdserve/handoff/receiver.py",
        "        if st.state in (StagingState.RESERVING, StagingState.PULLING):",
        "        if st.state is StagingState.PULLING:",
    ),
    "cbe0f87: an import does not count cached-but-free prefix blocks against the free pool": (
        "pdserve/engine/handoff.py",
        "            reclaimed = self._num_free(cached)\n        need = total - len(cached)",
        "            reclaimed = 0\n        need = total - len(cached)",
    ),
}
MACHINE = "tests/unit/test_handoff_machine.py"
NO_SHRINK = [
    ("from hypothesis import HealthCheck, settings", "from hypothesis import HealthCheck, Phase, settings"),
    ("    deadline=None,\n", "    deadline=None,\n    phases=(Phase.explicit, Phase.reuse, Phase.generate),\n"),
]
KEEP = ("E ", "FAILED", "AssertionError", "    | AssertionError", "    | RuntimeError")


def main() -> int:
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "results", "__pycache__"))
        machine = copy / MACHINE  # report the first failure found, unshrunk: shrinking takes minutes
        text = machine.read_text()
        for fixed, faster in NO_SHRINK:
            assert text.count(fixed) == 1, fixed
            text = text.replace(fixed, faster)
        machine.write_text(text)
        for name, (path, fixed, race) in RACES.items():
            f = copy / path
            text = f.read_text()
            if text.count(fixed) != 1:
                raise SystemExit(f"{name}: the fixed code is no longer in {path}; update this script")
            f.write_text(text.replace(fixed, race))
            t = time.monotonic()
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", MACHINE]
            out = subprocess.run(cmd, cwd=copy, capture_output=True, text=True).stdout
            f.write_text(text)
            found = " failed" in out.splitlines()[-1] if out else False
            missed += not found
            print(f"{'FOUND' if found else 'MISSED'} ({time.monotonic() - t:.0f} s) {name}")
            lines = [ln.strip() for ln in out.splitlines() if ln.startswith(KEEP)]
            print("\n".join(f"    {ln}" for ln in dict.fromkeys(lines[:8])), flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
