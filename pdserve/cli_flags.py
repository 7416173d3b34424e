"""Command-line flags generated from the config tree: every leaf key `a.b_c` is `--a.b-c VALUE`, and the
established short flags (`--port`, `--prefill-workers`, ...) are aliases of their keys. Values reach the tree
as strings (JSON for mappings) and pydantic validates them, so a bad value names its key. `pdserve generate`'s
sampling flags are generated the same way from `SamplingParams`' fields."""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Iterator
from typing import Any

import msgspec
from pydantic import BaseModel

from pdserve.config import ServeConfig
from pdserve.protocol import SamplingParams

# short flag -> key; the key's flag works too. Defaults and help come from the tree.
ALIASES = {
    "--name": "name",
    "--address": "address",
    "--model": "engine.model",
    "--dtype": "engine.dtype",
    "--device": "engine.device",
    "--block-size": "engine.block_size",
    "--num-kv-blocks": "engine.num_kv_blocks",
    "--max-model-len": "engine.max_model_len",
    "--max-num-seqs": "engine.max_num_seqs",
    "--max-num-batched-tokens": "engine.max_num_batched_tokens",
    "--lease-s": "worker.lease_s",
    "--transport": "kv.transport",
    "--routing": "routing.policy",
    "--routing-temperature": "routing.temperature",
    "--max-waiting": "routing.max_waiting_per_worker",
    "--local-prefill-max-tokens": "routing.disagg.local_prefill_max_tokens",
    "--prefill-workers": "pools.prefill",
    "--decode-workers": "pools.decode",
    "--colocated-workers": "pools.colocated",
    "--host": "frontend.host",
    "--port": "frontend.port",
    "--frontends": "frontend.frontends",
    "--api-key": "frontend.api_key",
    "--served-model-name": "frontend.served_model_name",
    "--max-pending": "frontend.max_pending",
    "--prometheus-url": "autoscaling.prometheus_url",
}
_DEST_PREFIX = "cfg:"


def leaves(model: type[BaseModel] = ServeConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, FieldInfo) for every leaf of the tree."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from leaves(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, section: str | None = None) -> None:
    """`--config FILE` plus one flag per leaf key (and its alias), or per key of `section` only; unset flags
    stay out of the namespace."""
    parser.add_argument("--config", default=None, metavar="FILE", help="a YAML file with config keys")
    short = {key: alias for alias, key in ALIASES.items()}
    group = parser.add_argument_group("config keys (also PDSERVE_<SECTION>__<KEY> and --config FILE)")
    for key, field in leaves():
        if section is not None and not key.startswith(section + "."):
            continue
        names = [short[key], flag_of(key)] if key in short else [flag_of(key)]
        default = field.get_default(call_default_factory=True)
        text = f"{field.description or key} (key {key}; default {json.dumps(default, default=str)})"
        text = text.replace("%", "%%")  # argparse formats help strings
        group.add_argument(*names, dest=_DEST_PREFIX + key, default=argparse.SUPPRESS, metavar="V", help=text)


def overrides(args: argparse.Namespace) -> dict:
    """The nested dict of the config keys given on the command line."""
    out: dict = {}
    fields = dict(leaves())
    for dest, raw in vars(args).items():
        if not dest.startswith(_DEST_PREFIX):
            continue
        key = dest[len(_DEST_PREFIX) :]
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = _value(key, raw, fields[key])
    return out


def _value(key: str, raw: str, field) -> Any:
    text = str(field.annotation)
    if "dict" in text or "list" in text:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            shape = "an object" if "dict" in text else "a list"
            raise ValueError(f"{key}: expected {shape} in JSON, got {raw!r} ({e})") from None
    if raw.lower() in ("none", "null") and "None" in text:
        return None
    return raw


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")  # the SamplingParams fields with a flag


def add_sampling_flags(parser: argparse.ArgumentParser, defaults: SamplingParams) -> None:
    """`--max-tokens`, `--temperature`, ...: one flag per field of SAMPLING_FLAGS, typed as the field,
    defaulting to its value in `defaults`."""
    types = {f.name: f.type for f in msgspec.structs.fields(SamplingParams)}
    group = parser.add_argument_group("sampling (pdserve.SamplingParams)")
    for name in SAMPLING_FLAGS:
        default = getattr(defaults, name)
        group.add_argument(
            flag_of(name), type=_scalar(types[name]), default=default, metavar="V", help=f"{name} (default {default})"
        )


def sampling_params(args: argparse.Namespace, defaults: SamplingParams) -> SamplingParams:
    """`defaults` with the sampling flags' values; a bad value is a ValueError naming the field."""
    return msgspec.structs.replace(defaults, **{name: getattr(args, name) for name in SAMPLING_FLAGS}).validate()


def _scalar(kind):
    """An argparse `type` for an int or float field, optional ones taking 'none'."""
    options = typing.get_args(kind) or (kind,)
    base = next(t for t in options if t is not type(None))
    if base not in (int, float):
        raise TypeError(f"no flag type for a {kind} field")

    def parse(text: str):
        return None if type(None) in options and text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error: "invalid int value"
    return parse
