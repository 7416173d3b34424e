"""How much of what /openapi.json admits the server accepts: schemathesis generates schema-valid (positive)
bodies for /v1/completions and /v1/chat/completions, derandomized, and sends each to a live in-process server
(the demo model); per operation the share answered 200 and the 400s by the parameter they name. A schema that
states the server's real contract leaves only rules JSON Schema cannot say (best_of equal to n, prompts x n
within frontend.limits.max_n, a prompt that fits the context). Compare two commits by running it on each.

    python bench/schema_acceptance.py                          # 200 cases per operation, 1024-token context
    python bench/schema_acceptance.py --examples 500 --max-model-len 32
"""

from __future__ import annotations

import argparse
from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from bench.common import print_table, write_json
from pdserve.api.app import create_app
from pdserve.config import EngineConfig, RequestLimits
from pdserve.live.thread import serving
from pdserve.workers.local_client import LocalClient

PATHS = ("/v1/completions", "/v1/chat/completions")
LIMITS = RequestLimits(max_n=4, max_stop_strings=4, max_stop_string_chars=16, max_stop_token_ids=8)


def measure(schema, path: str, examples: int) -> dict:
    statuses, refusals = Counter(), Counter()

    @given(case=schema[path]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case):
        r = case.call(timeout=60)
        statuses[r.status_code] += 1
        if r.status_code != 200:
            err = r.json().get("error", {})
            refusals[err.get("param") or err.get("code") or "?"] += 1

    run()
    n = sum(statuses.values())
    return {"operation": path, "cases": n, "accepted": statuses[200], "accepted_pct": 100 * statuses[200] / n,
            "refused_by_param": dict(refusals.most_common())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=200, help="generated cases per operation")
    ap.add_argument("--max-model-len", type=int, default=1024, help="the server's context length")
    ap.add_argument("--out", default="schema_acceptance")
    args = ap.parse_args()
    backend = LocalClient(EngineConfig(num_kv_blocks=256, max_model_len=args.max_model_len))
    try:
        with serving(create_app(backend, limits=LIMITS)) as srv:
            schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
            rows = [measure(schema, path, args.examples) for path in PATHS]
    finally:
        backend.engine_thread.stop()
    print_table(rows, ["operation", "cases", "accepted", "accepted_pct", "refused_by_param"])
    print(f"wrote {write_json(args.out, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
