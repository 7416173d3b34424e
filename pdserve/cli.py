"""`pdserve` command line: serve (the disaggregated deployment + OpenAI API), generate (offline, one
engine) and make-model (write the demo model)."""

from __future__ import annotations

import argparse
import sys
import time

DEMO_NOTE = "note: no --model given; using pdserve's embedded demo model (random weights: the text is noise)"


def _generate(args: argparse.Namespace) -> int:
    from pdserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, num_kv_blocks=args.num_kv_blocks, seed=args.seed)
    if llm.is_demo:
        print(DEMO_NOTE, file=sys.stderr)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    start = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    elapsed = time.perf_counter() - start
    print(out.text)
    print(
        f"[{len(out.token_ids)} tokens in {elapsed:.2f}s, finish_reason={out.finish_reason}, "
        f"prompt_tokens={out.num_prompt_tokens}, model={llm.engine.model_id}]",
        file=sys.stderr,
    )
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from pdserve.engine.models.demo import write_demo_model

    write_demo_model(args.dir)
    print(f"wrote the demo model (random weights) to {args.dir}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from pdserve.cluster.builder import ServeConfig
    from pdserve.config import EngineConfig

    engine = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    config = ServeConfig(
        engine=engine,
        prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers,
        colocated_workers=args.colocated_workers,
        transport=args.transport,
        routing=args.routing,
        address=args.address,
        lease_s=args.lease_s,
        max_waiting_per_worker=args.max_waiting,
        routing_temperature=args.routing_temperature,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
    )
    if args.model is None:
        print(DEMO_NOTE, file=sys.stderr)
    return asyncio.run(_serve_async(config, args))


async def _serve_async(config, args) -> int:
    import asyncio

    import uvicorn

    from pdserve.api.app import create_app
    from pdserve.cluster.builder import build
    from pdserve.metrics import Metrics

    metrics = Metrics()
    deployment = await build(config, metrics)
    app = create_app(
        deployment.client,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        metrics=metrics,
        max_pending=args.max_pending,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        name = args.served_model_name or deployment.client.info.model_id
        workers = f"{config.prefill_workers} prefill + {config.decode_workers} decode"
        if config.colocated_workers:
            workers += f" + {config.colocated_workers} colocated"
        auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
        print(
            f"pdserve ready on http://{args.host}:{args.port}/v1 (model {name}; {workers} workers; "
            f"transport {config.transport}; routing {config.routing})",
            flush=True,
        )
        print(
            f"try: curl -s http://127.0.0.1:{args.port}/v1/completions -H 'Content-Type: application/json'{auth}"
            f' -d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\'',
            flush=True,
        )

    task = asyncio.ensure_future(announce())
    try:
        await server.serve()
    finally:
        task.cancel()
        await deployment.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="start workers on Ray and the OpenAI-compatible HTTP API")
    srv.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded demo)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients send (default: model id)")
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per worker)")
    srv.add_argument("--prefill-workers", type=int, default=1)
    srv.add_argument("--decode-workers", type=int, default=1)
    srv.add_argument("--colocated-workers", type=int, default=0, help="workers that prefill and decode (no handoff)")
    srv.add_argument("--transport", default="nixl", choices=["nixl", "local"], help="KV transfer between workers")
    srv.add_argument(
        "--routing",
        default="prefix_aware",
        help="routing policy: prefix_aware, least_loaded, round_robin, sglang_cache_aware, dynamo_kv_cost",
    )
    srv.add_argument(
        "--routing-temperature",
        type=float,
        default=0.0,
        help="prefix_aware: softmax temperature over costs in tokens, to spread near-ties (0: argmin)",
    )
    srv.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=64,
        help="prefill on the decode worker when it caches all but at most this many prompt tokens",
    )
    srv.add_argument("--address", default=None, help="join a Ray cluster ('auto' or its address; also RAY_ADDRESS)")
    srv.add_argument("--host", default="0.0.0.0")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks per worker")
    srv.add_argument("--block-size", type=int, default=16)
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--max-num-seqs", type=int, default=128)
    srv.add_argument("--max-num-batched-tokens", type=int, default=2048)
    srv.add_argument("--lease-s", type=float, default=10.0, help="how long a prefill worker holds unclaimed KV")
    srv.add_argument("--max-waiting", type=int, default=64, help="queued requests per worker before 429")
    srv.add_argument("--max-pending", type=int, default=1024, help="requests in flight at the API before 429")
    srv.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="generate a completion offline with one local engine")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded demo)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-kv-blocks", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.set_defaults(func=_generate)

    mk = sub.add_parser("make-model", help="write the embedded demo model as a Hugging Face directory")
    mk.add_argument("dir")
    mk.set_defaults(func=_make_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
