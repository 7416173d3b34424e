"""`pdserve` command line: serve (a deployment + OpenAI API), config (the effective config), status, scale,
drain and shutdown (a running deployment), generate (offline, one engine), make-model (the demo model)."""

from __future__ import annotations

import argparse
import sys
import time

from pdserve.protocol import SamplingParams

DEMO_NOTE = "note: no --model given; using pdserve's embedded demo model (random weights: the text is noise)"
# `pdserve generate` decodes greedily and repeatably by default; every other field is SamplingParams' default
GENERATE_SAMPLING = SamplingParams(max_tokens=64, temperature=0.0, seed=0)


def _generate(args: argparse.Namespace) -> int:
    from pdserve import LLM
    from pdserve.cli_flags import sampling_params

    params = sampling_params(args, GENERATE_SAMPLING)
    engine = _load(args).engine
    llm = LLM(engine.model, **engine.model_dump(exclude={"model"}))
    if llm.is_demo:
        print(DEMO_NOTE, file=sys.stderr)
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


def _load(args: argparse.Namespace):
    from pdserve.cli_flags import overrides
    from pdserve.config import load_config

    return load_config(args.config, overrides(args))


def _config(args: argparse.Namespace) -> int:
    from pdserve.config import to_yaml

    print(to_yaml(_load(args)), end="")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pdserve.cli_ops import serve

    config = _load(args)
    if config.engine.model is None:
        print(DEMO_NOTE, file=sys.stderr)
    if args.autoscale:
        config = config.model_copy(update={"autoscaling": config.autoscaling.model_copy(update={"enabled": True})})
    return serve(config, args.detach)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    from pdserve.cli_flags import add_config_flags

    srv = sub.add_parser("serve", help="start a deployment (controller, workers, HTTP frontends) on Ray")
    srv.add_argument("--detach", action="store_true", help="leave it running in the Ray cluster and return")
    srv.add_argument(
        "--autoscale", action="store_true",
        help="size the pools from Prometheus (autoscaling.enabled; with no --prometheus-url a local one is started)",
    )  # fmt: skip
    add_config_flags(srv)
    srv.set_defaults(func=_serve)

    cfg = sub.add_parser("config", help="print the effective config (flags > PDSERVE_* env > --config file > defaults)")
    add_config_flags(cfg)
    cfg.set_defaults(func=_config)

    from pdserve.cli_flags import add_sampling_flags

    gen = sub.add_parser("generate", help="generate a completion offline with one local engine")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_sampling_flags(gen, GENERATE_SAMPLING)
    add_config_flags(gen, section="engine")
    gen.set_defaults(func=_generate)

    from pdserve.cli_ops import add_parsers

    add_parsers(sub)

    mk = sub.add_parser("make-model", help="write the embedded demo model as a Hugging Face directory")
    mk.add_argument("dir")
    mk.set_defaults(func=_make_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pdserve.cli_ray import use_ray_token_auth

    # here, before any command imports Ray: Ray reads RAY_AUTH_MODE once, at its import
    use_ray_token_auth()
    try:
        return args.func(args)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
