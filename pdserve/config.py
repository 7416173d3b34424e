"""The one configuration tree (torch-free): engine, worker, KV transport, routing, disaggregation, pools,
frontend and failure handling, each default written once here.

Sources, highest first: CLI flags (`pdserve.cli_config` generates them from this tree), environment
(`PDSERVE_<SECTION>__<KEY>`, e.g. `PDSERVE_ENGINE__BLOCK_SIZE=32`), a YAML file (`--config FILE`), defaults.
Keys are snake_case and nest as the Helm chart's values do. An unknown key or a bad value is a
`ValueError` (pydantic's ValidationError) naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from pdserve.policy_options import POLICY_OPTIONS, PolicyOptions

ROLES = ("prefill", "decode", "colocated")
# "decode-capable" (resp. "prefill-capable"): a role that can decode (prefill), colocated included; the word
# "decode" alone means the decode role
DECODE_CAPABLE = ("decode", "colocated")
PREFILL_CAPABLE = ("prefill", "colocated")


def decode_capable(role: str) -> bool:
    return role in DECODE_CAPABLE


POLICY_NAMES = tuple(POLICY_OPTIONS)


class Section(BaseModel):
    """A frozen config section; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def replace(self, **changes: Any):
        """A validated copy with `changes` applied."""
        return type(self).model_validate({**self.model_dump(), **changes})


class EngineConfig(Section):
    """One engine: which model, where, and how big its KV cache and batches are."""

    model: str | None = Field(None, description="Hugging Face model directory (default: the embedded demo model)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and KV dtype")
    device: str = Field("cpu", description="cpu, or cuda[:N] (one GPU per worker)")
    block_size: int = Field(16, gt=0, description="tokens per KV block")
    num_kv_blocks: int | None = Field(None, ge=2, description="KV cache blocks per engine (default: by memory)")
    kv_cache_memory: int | None = Field(
        None, gt=0, description="KV cache bytes (default: 512 MiB on CPU; on a GPU, by gpu_memory_utilization)"
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of the GPU's memory this engine may use: weights, the largest step's activations "
        "(measured by a profile step at start-up) and the KV cache, which gets the rest",
    )
    max_model_len: int | None = Field(None, gt=0, description="context length (default: the model's)")
    max_num_seqs: int = Field(128, gt=0, description="requests batched per step")
    max_num_batched_tokens: int = Field(2048, gt=0, description="tokens per step; longer prompts are chunked")
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="devices one engine spans (offline LLM on one host so far): rank 0 schedules and samples, "
        "ranks 1..N-1 are processes it starts; must divide the attention heads",
    )
    attention_backend: Literal["auto", "torch", "flashinfer_reference", "flashinfer"] = Field(
        "auto",
        description="attention kernels: torch (the reference), flashinfer (CUDA; not yet verified on a GPU), "
        "flashinfer_reference (plain torch over FlashInfer's paged format: the kernels' oracle), or auto (torch "
        "until a GPU run has verified flashinfer)",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="decode at fixed batch sizes from static buffers, captured as CUDA graphs (default: on CUDA "
        "when the attention backend can be captured, i.e. flashinfer; true on CPU runs the same path uncaptured)",
    )
    seed: int = Field(0, description="seed for requests that carry none")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {v!r}")
        return v


class WorkerConfig(Section):
    """A worker actor around one engine: the KV handoff lease, load reports, Ray resources."""

    lease_s: float = Field(10.0, gt=1, description="how long a sender holds KV nobody has pulled")
    pull_timeout_s: float = Field(5.0, gt=0, description="a KV pull's time limit (also capped by the lease)")
    reserve_timeout_s: float = Field(10.0, gt=0, description="how long an import waits for free KV blocks")
    report_interval_s: float = Field(0.2, gt=0, description="load and KV-event reports (the heartbeat)")
    liveness_interval_s: float = Field(0.5, gt=0, description="how often a lease holder pings its receiver")
    consumer_timeout_s: float = Field(10.0, gt=2, description="a frontend not polling this long: abort its requests")
    torch_threads: int | None = Field(None, gt=0, description="torch threads per worker (default: cores/workers)")
    cpus: float | None = Field(None, ge=0, description="Ray CPUs per worker actor (default 1)")


class NixlConfig(Section):
    """The NIXL agent of each worker (UCX backend). Peers exchange agent metadata through Ray, so the agent
    runs no listener thread. Defaults suit workers on one host (shared-memory/CMA reads need nothing from
    the sender); across nodes (RDMA or TCP, e.g. the Helm chart's pods) turn on `progress_thread`, and with
    it `ucx_error_handling_mode: peer`."""

    progress_thread: bool = Field(
        False,
        description="run NIXL's UCX progress thread (it polls without sleeping: a core per worker); needed where "
        "connecting to a peer takes the sender's progress: across nodes",
    )
    ucx_error_handling_mode: Literal["none", "peer"] = Field(
        "none",
        description="UCX peer-failure handling: peer (a dead peer fails its pulls; only transports that support "
        "it; needs progress_thread) or none",
    )
    ucx_devices: str = Field(
        "", description="network devices UCX may use, e.g. 'mlx5_0:1,mlx5_1:1' (empty: all; as UCX_NET_DEVICES)"
    )
    num_threads: int = Field(2, ge=1, description="a large pull is split over this many threads and UCX workers")
    split_bytes: int = Field(8 << 20, ge=1, description="pulls of at least this many bytes are split")

    @field_validator("ucx_error_handling_mode")
    @classmethod
    def _peer_needs_progress(cls, v: str, info: ValidationInfo) -> str:
        if v == "peer" and info.data.get("progress_thread") is False:
            raise ValueError("'peer' needs progress_thread: true (without it a pull waits on the sender and times out)")
        return v


class KVConfig(Section):
    transport: Literal["nixl", "nccl", "local"] = Field(
        "nixl",
        description="KV transfer between workers: nixl (one-sided RDMA/UCX reads), nccl (collective send/recv: "
        "NCCL on CUDA, Gloo on CPU), local (in-process copy, tests)",
    )
    nixl: NixlConfig = Field(default_factory=NixlConfig)


class DisaggConfig(Section):
    """When the decode worker prefills a request itself instead of handing it to a prefill worker."""

    local_prefill_max_tokens: int = Field(64, description="decode worker lacks at most this many prompt tokens")
    prefill_saturated_tokens: int = Field(8192, description="every prefill worker has this many tokens queued")
    decode_room_fraction: float = Field(0.25, ge=0, le=1, description="...and the decode worker keeps this KV free")
    # A local prefill's chunks share the decode worker's steps with every running decode: 1024 tokens add
    # 35-55 ms to a step (0-20k tokens cached before them), within a 100 ms TPOT budget beside the decode
    # itself; an 8192-token chunk adds 0.3-0.5 s. Modelled, not measured: `LatencyModel.chunk_s` of the
    # simulator's derived roofline calibration (pdserve/sim/calibration_h100.json: a Llama-3-8B-shaped model
    # in bf16 on one H100 SXM5 from datasheet peaks and assumed efficiencies; `python -m bench.sim.gpu_model`).
    local_prefill_step_tokens: int = Field(
        1024, ge=0, description="...and its queued prefill tokens, this prompt's included, stay within this"
    )


class RoutingConfig(Section):
    policy: Literal[POLICY_NAMES] = Field("prefix_aware", description="routing policy")  # type: ignore[valid-type]
    temperature: float = Field(0.0, ge=0, description="prefix_aware: softmax temperature over costs (0: argmin)")
    policy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the chosen policy (pdserve.policy_options: each policy's keys); unknown keys refused",
    )
    max_waiting_per_worker: int = Field(
        64, gt=0, description="requests a worker queues beyond engine.max_num_seqs running; past that it refuses"
    )
    admission_retries: int = Field(
        2, ge=0, description="routes again of a request a worker refused at its bound, before it is a 429"
    )
    max_index_blocks: int = Field(1_000_000, gt=0, description="global prefix index bound (LRU)")
    prediction_ttl_s: float = Field(
        10.0, gt=0, description="a decision's predicted prefix-cache entries last this long unless KV events confirm"
    )
    # A decision predicts at most this many blocks past each chosen worker's match (0: no limit): enough for
    # a burst to see where its shared prefix went, while a decision's cost stops growing with the prompt.
    max_predicted_blocks: int = Field(64, ge=0)
    disagg: DisaggConfig = Field(default_factory=DisaggConfig)

    # Field validators see the fields declared before theirs (info.data), so an error names its own key.
    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float, info: ValidationInfo) -> float:
        policy = info.data.get("policy")
        if v and policy is not None and policy != "prefix_aware":
            raise ValueError(f"only the prefix_aware policy samples by temperature, not {policy}")
        return v

    @field_validator("policy_options")
    @classmethod
    def _policy_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # validated against the chosen policy's model (its errors are named routing.policy_options.KEY); the
        # keys given are kept, typed, so `pdserve config` prints what was set
        if "policy" not in info.data:  # the policy itself was refused
            return v
        options = POLICY_OPTIONS[info.data["policy"]].model_validate(v).model_dump(include=set(v))
        given, temperature = options.get("temperature"), info.data.get("temperature")
        if given is not None and temperature and given != temperature:
            raise ValueError(f"temperature {given} disagrees with routing.temperature {temperature}")
        return options

    def options(self) -> PolicyOptions:
        """The chosen policy's typed options; `temperature` is prefix_aware's `temperature` option."""
        given = dict(self.policy_options)
        if self.temperature:
            given.setdefault("temperature", self.temperature)
        return POLICY_OPTIONS[self.policy].model_validate(given)


class PoolsConfig(Section):
    """Target pool sizes, and the Ray resources that pin each role to its nodes (e.g. {"pdserve_prefill": 1})."""

    prefill: int = Field(1, ge=0, description="prefill workers")
    decode: int = Field(1, ge=0, description="decode workers")
    colocated: int = Field(0, ge=0, description="workers that prefill and decode (no handoff)")
    resources: dict[Literal["prefill", "decode", "colocated"], dict[str, float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sizes(self) -> PoolsConfig:
        if self.decode + self.colocated == 0:
            raise ValueError("pools: need at least one decode worker or colocated worker")
        if self.prefill and not self.decode:
            raise ValueError("pools.prefill: prefill workers need at least one decode worker to hand off to")
        return self

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.colocated

    def size(self, role: str) -> int:
        return getattr(self, role)


class RequestLimits(Section):
    """What one HTTP request may ask for; beyond it the answer is a 4xx, before any work is done. Token
    lengths need no key here: a prompt must fit the engine's context (max_model_len), and so must max_tokens."""

    max_body_bytes: int = Field(
        8 * 2**20, gt=0, description="request body size; larger gets 413 (a 128k-token prompt is about 1 MiB)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not fully received this long after its headers gets 408"
    )
    max_n: int = Field(128, ge=1, description="choices per request (n, times the prompts of a batch)")
    max_stop_strings: int = Field(16, ge=0, description="stop strings per request (OpenAI allows 4)")
    max_stop_string_chars: int = Field(1024, ge=1, description="characters per stop string")
    max_stop_token_ids: int = Field(1024, ge=0, description="stop_token_ids per request")


class FrontendConfig(Section):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (frontend i listens on port + i)")
    frontends: int = Field(1, ge=1, description="HTTP frontends")
    # Key entries are `KEY` or `KEY tenant=NAME` (see `parse_key_entry`); pdserve.api.auth applies them.
    api_key: str | None = Field(None, description="an API key: require 'Authorization: Bearer KEY' on /v1/*")
    api_keys: list[str] = Field(default_factory=list, description="more API keys (entries 'KEY [tenant=NAME]')")
    api_keys_file: str | None = Field(
        None, min_length=1, description="a file of API keys, one entry a line ('#' comments), re-read when it changes"
    )
    admin_keys: list[str] = Field(default_factory=list, description="keys for /admin/* (API keys are refused there)")
    admin_keys_file: str | None = Field(None, min_length=1, description="a file of admin keys, as api_keys_file")
    metrics_auth: bool = Field(False, description="/metrics needs an API or admin key too")
    tenant_salts: bool = Field(
        True, description="each API key's requests get their own prefix-cache salt (its tenant, else the key's)"
    )
    served_model_name: str | None = Field(None, description="the model name clients send (default: model id)")
    max_pending: int = Field(1024, gt=0, description="requests in flight per frontend before 429")
    stream_gap_timeout_s: float = Field(
        5.0, gt=0, description="a token missing from a stream this long while later ones came (after a migration) "
        "fails the attempt: the request continues elsewhere"
    )  # fmt: skip
    limits: RequestLimits = Field(default_factory=RequestLimits)
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray resources each frontend needs: pins them to nodes a Service reaches"
    )

    @field_validator("api_key", "api_keys", "admin_keys")
    @classmethod
    def _key_entries(cls, v: str | list[str] | None) -> str | list[str] | None:
        for entry in [v] if isinstance(v, str) else v or ():
            parse_key_entry(entry)
        return v

    @model_validator(mode="after")
    def _metrics_auth(self) -> FrontendConfig:
        keys = (self.api_key, self.api_keys, self.api_keys_file, self.admin_keys, self.admin_keys_file)
        if self.metrics_auth and not any(keys):
            raise ValueError("frontend.metrics_auth: set API or admin keys first (an open server has no keys)")
        return self


def parse_key_entry(entry: str) -> tuple[str, str | None]:
    """A key entry `KEY` or `KEY tenant=NAME` as (key, tenant); a ValueError says what is wrong with it."""
    key, *attrs = entry.split() or [""]
    if not key:
        raise ValueError("a key is empty")
    tenant = None
    for attr in attrs:
        name, _, value = attr.partition("=")
        if name != "tenant" or not value or tenant is not None:
            raise ValueError(f"a key entry takes one 'tenant=NAME' after the key, got {attr!r}")
        tenant = value
    return key, tenant


class FailureConfig(Section):
    worker_timeout_s: float = Field(10.0, gt=0, description="a worker whose reports stop this long is dead")
    max_request_retries: int = Field(2, ge=0, description="re-routes of a request whose worker died")
    replace_dead_workers: bool = Field(True, description="start a replacement for a dead worker")
    frontend_timeout_s: float = Field(
        10.0, gt=0, description="a frontend not answering the controller's pings this long is hung: killed, replaced"
    )
    controller_timeout_s: float = Field(
        30.0, gt=5.0, description="a controller not answering a frontend this long is hung: killed, Ray restarts it"
    )


class ControllerConfig(Section):
    metrics_port: int = Field(9400, ge=0, le=65535, description="the controller's /metrics port (0: any free one)")
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of the controller (-1: unlimited)")
    worker_start_timeout_s: float = Field(300.0, gt=0, description="a worker not ready by then is replaced")
    drain_timeout_s: float = Field(300.0, gt=0, description="a draining worker is stopped after this long")
    call_timeout_s: float = Field(
        10.0, gt=0, description="the controller's calls to a worker or frontend (info, peers, migratable, shutdown)"
    )
    monitor_interval_s: float = Field(
        0.2, gt=0, description="how often the controller checks heartbeats and reconciles the pools"
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray resources the controller needs: pins it (and its /metrics) to a node"
    )


class MigrationConfig(Section):
    """Live migration of running requests between workers (multi-stage, as Llumnix)."""

    final_blocks: int = Field(2, ge=0, description="pause the request when at most this many blocks are left to copy")
    max_stages: int = Field(8, ge=1, description="copy stages before the final one, at most")
    stage_timeout_s: float = Field(30.0, gt=0, description="a stage not done by then fails the migration")
    first_token_wait_s: float = Field(
        5.0, gt=0, description="the target waits at least this long (or stage_timeout_s / 2) for the resumed "
        "request's first token before it answers the final stage"
    )  # fmt: skip
    on_out_of_blocks: bool = Field(True, description="migrate a request away instead of preempting it")
    rebalance: bool = Field(True, description="move requests from the most to the least loaded worker")
    rebalance_interval_s: float = Field(1.0, gt=0, description="how often the rebalancer looks")
    rebalance_threshold: float = Field(
        8.0, gt=0, description="move when free KV blocks per running request differ by more than this"
    )
    drain_mode: Literal["migrate", "wait"] = Field("migrate", description="how a draining worker empties")


class AutoscalingConfig(Section):
    """Sizing the prefill and decode pools from Prometheus signals (observe -> decide -> actuate)."""

    enabled: bool = Field(False, description="run the autoscaler in the controller")
    prometheus_url: str | None = Field(None, description="Prometheus HTTP API; none: start a local prometheus")
    interval_s: float = Field(10.0, gt=0, description="how often the autoscaler observes and decides")
    min_prefill: int = Field(0, ge=0, description="fewest prefill-capable workers (colocated count too)")
    max_prefill: int = Field(8, ge=0, description="most prefill workers")
    min_decode: int = Field(1, ge=1, description="fewest decode-capable workers (colocated count too)")
    max_decode: int = Field(8, ge=1, description="most decode workers")
    decode_tokens_per_worker: float = Field(
        200.0, gt=0, description="decode tokens/s one decode worker should carry (its capacity target)"
    )
    kv_usage_high: float = Field(0.8, gt=0, le=1, description="decode pool KV usage that asks for one more")
    prefill_tokens_per_worker: float = Field(
        4096.0, gt=0, description="queued prompt tokens one prefill worker may hold before another is added"
    )
    prefill_tokens_per_s_per_worker: float = Field(
        0.0, ge=0, description="prompt tokens/s one prefill worker should carry; 0: size prefill by the queue alone"
    )
    prefill_queue_drain_s: float = Field(
        2.0, gt=0, description="with a prompt throughput: a backlog the ready workers cannot clear in this long "
        "asks for workers that clear the rest in it"
    )  # fmt: skip
    attainment_min_load: float = Field(
        0.5, ge=0, description="a low attainment adds a worker only to a pool this loaded (share of its targets)"
    )
    ttft_slo_s: float = Field(2.0, gt=0, description="time-to-first-token SLO")
    tpot_slo_s: float = Field(0.1, gt=0, description="time-per-output-token SLO")
    attainment_target: float = Field(0.9, gt=0, le=1, description="share of requests meeting an SLO")
    pd_ratio_min: float = Field(0.0, ge=0, description="fewest prefill workers per decode worker")
    pd_ratio_max: float = Field(
        4.0, gt=0, description="most prefill workers per decode worker (more prefill brings decode workers along)"
    )
    scale_in_window_s: float = Field(60.0, ge=0, description="scale in only after demand stayed lower this long")
    scale_in_max_workers: int = Field(1, ge=1, description="most workers one scale-in removes from each pool")
    cooldown_s: float = Field(30.0, ge=0, description="no new action this long after one")
    flip_roles: bool = Field(True, description="move a worker from a pool with slack to a short one")
    max_workers: int = Field(
        0, ge=0, description="most workers in all pools together (the GPU budget); 0: no budget. At the budget a "
        "short pool waits for a flip from a pool with slack"
    )  # fmt: skip
    action_timeout_s: float = Field(300.0, gt=0, description="an action not done by then is retried")


class ServeConfig(BaseSettings):
    """A whole deployment. `name` names its controller and actors in Ray's `pdserve` namespace."""

    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix="PDSERVE_", env_nested_delimiter="__", validate_default=True
    )

    name: str = Field("pdserve", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="deployment name")
    address: str | None = Field(None, description="join a Ray cluster ('auto' or its address; also RAY_ADDRESS)")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    kv: KVConfig = Field(default_factory=KVConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    frontend: FrontendConfig = Field(default_factory=FrontendConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    migration: MigrationConfig = Field(default_factory=MigrationConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.kv.transport == "local" and self.pools.prefill:
            raise ValueError("kv.transport: 'local' moves KV only inside one process; use 'nixl' between workers")
        if self.engine.tensor_parallel_size > 1:
            raise ValueError(
                "engine.tensor_parallel_size: tensor parallelism runs in the offline LLM only so far; "
                "a deployment's workers are one device each"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if _yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_yaml_file))
        return tuple(sources)


NAMESPACE = "pdserve"  # the Ray namespace of every deployment's named actors


def worker_actor_name(deployment: str, worker_id: str) -> str:
    return f"{deployment}.worker.{worker_id}"


def frontend_actor_name(deployment: str, index: int) -> str:
    return f"{deployment}.frontend.{index}"


def controller_actor_name(deployment: str) -> str:
    return f"{deployment}.controller"


_yaml_file: str | None = None  # set only while `load_config` builds a config from a file


def load_config(file: str | None = None, overrides: dict | None = None, env: bool = True) -> ServeConfig:
    """The effective config: `overrides` (CLI, nested dict) over the environment over `file` over defaults."""
    global _yaml_file
    if file is not None:
        import pathlib

        import yaml

        path = pathlib.Path(file)
        if not path.is_file():
            raise ValueError(f"config file {file} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {file} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"config file {file} must hold a mapping of keys, got {type(data).__name__}")
    _yaml_file = file
    try:
        if env:
            return ServeConfig(**(overrides or {}))
        return ServeConfig.model_validate(overrides or {})
    finally:
        _yaml_file = None


def to_yaml(config: ServeConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
