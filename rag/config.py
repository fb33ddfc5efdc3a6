"""Typed schemas for the one config tree in `conf/`.

Every entry point (the server, the sweep, the tests) composes `conf/config.yaml`; these
dataclasses are registered in Hydra's ConfigStore so a typo or a wrong type in YAML or on
the command line fails at composition time, not deep inside a run.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rag.loadgen.config import LoadConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    """Which embedder and generator to load, and how to run them.

    A model source is one of: `package:<module>/<relative path>` (a file or folder shipped
    inside an installed package), `tiny:<family>` (a small random model built at run time),
    `shaped:<hub model>` (random weights in that model's architecture, built on the device),
    a local path, or a hub id (`org/name`).
    """

    name: str = MISSING
    generator: str = MISSING
    embedder: str = MISSING
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    torch_threads: int = 0  # 0 = torch's default
    max_new_tokens: int = 32
    ignore_eos: bool = False  # always generate max_new_tokens (fixed work, for benchmarks)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    max_prompt_tokens: int = 1024
    embed_max_tokens: int = 256
    query_prefix: str = ""  # e5-style embedders want "query: "
    doc_prefix: str = ""  # and "passage: "
    system_prompt: str = (
        "You answer questions using only the given context. Answer in one or two sentences."
    )
    cache_dir: str = ""  # "" = the user's cache dir (platformdirs)
    engine: bool = True  # the step-level engine; false = transformers' generate
    engine_slots: int = 32  # sequences the engine decodes together at most
    int4_decode: bool = True  # decode with the GGUF's own 4-bit blocks (CPU, GGUF models)
    # Up to this many rows a 4-bit layer multiplies in 4 bits, above with its dense weight;
    # auto: the crossover timed on this machine when the engine is built (1..16 rows).
    int4_max_rows: int | str = "auto"
    max_prefill_tokens: int = 2048  # prompt tokens packed into one prefill at most
    # A decode-only step: dynamic (shaped by its rows), static (padded to fixed shapes), or
    # graphs (the static step replayed from CUDA graphs); auto = graphs on CUDA, else dynamic.
    decode_step: str = "auto"
    simulated: SimulatedCost | None = None  # set by model=simulated (generator: simulated)


@dataclass
class SimulatedCost:
    """What a simulated model sleeps per batch instead of computing: t(n) = fixed + n x
    per_query, for the query embedding and for generation (`python -m rag.service.simulated
    fit <pipeline bench record>` derives these from a measured real model)."""

    embed_fixed_ms: float = 2.0
    embed_per_query_ms: float = 0.5
    generate_fixed_ms: float = 200.0
    generate_per_query_ms: float = 50.0
    fitted_from: str = ""  # the bench record the numbers were fitted to ("" = set by hand)
    # A file that replicas sharing one simulated device lock while they compute, so they
    # divide its time instead of adding their own ("" = a device for each replica).
    device_lock: str = ""


@dataclass
class CorpusConfig:
    """Where documents come from and how they are indexed."""

    name: str = MISSING
    source: str = MISSING  # demo | stdlib | a path (.jsonl, .csv, or a folder of .txt/.md)
    min_chars: int = 80
    max_docs: int = 0  # 0 = all
    index: str = "flat"  # flat (exact inner product) | hnsw | ivf
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    ivf_nlist: int = 0  # 0 = about 4 * sqrt(n)
    ivf_nprobe: int = 32  # lists searched per query: more finds more true neighbours, slower
    embed_batch_size: int = 64
    cache_dir: str = ""  # "" = the user's cache dir


class ServerKind(StrEnum):
    """What serves a variant's requests; each preset in conf/variant/ names its kind.
    (Lower-case members: the config tree spells them so, and OmegaConf matches by name.)"""

    one_at_a_time = "one_at_a_time"  # the batcher with batches of one that never wait
    batcher = "batcher"  # a queue closed into batches (max_batch_size, max_wait_ms)
    continuous = "continuous"  # requests join and leave the engine's running batch per step
    balancer = "balancer"  # replicas of a server behind the balancer, sized by the autoscaler
    external = "external"  # a server the sweep measures but does not start


@dataclass
class VariantConfig:
    """How requests reach the pipeline: one at a time, through the batcher, into the
    engine's running batch (continuous), or through the balancer to replicas."""

    name: str = MISSING
    kind: ServerKind = MISSING
    max_batch_size: int = 20  # continuous: the running batch at most
    # continuous: the running batch at most while fewer than this many wait (0: max_batch_size)
    short_queue_batch_size: int = 0
    max_wait_ms: float = 10.0
    max_queue: int = 512
    request_timeout_s: float = 60.0  # each request's deadline from its arrival
    scaling: ScalingConfig | None = None  # set by variant=scaling


def token_limit(cfg: Config | DictConfig) -> int:
    """The most new tokens a request may ask for."""
    return max(cfg.server.max_tokens_limit, 0) or cfg.model.max_new_tokens


def batch_limits(variant: VariantConfig | DictConfig) -> tuple[int, float]:
    """(max_batch_size, max_wait_ms) as the variant runs them: one at a time is batches
    of one that never wait, whatever the keys say (a sweep may set them for every variant)."""
    if variant.kind is ServerKind.one_at_a_time:
        return 1, 0.0
    return variant.max_batch_size, variant.max_wait_ms


@dataclass
class ScalingConfig:
    """Replicas of the batched server behind a balancer, sized by an autoscaler.

    The signal is ongoing requests (in flight at a replica, queued or computing) per
    replica, as Ray Serve's `target_ongoing_requests`.  Scale-up follows the mean over
    `stable_window_s` once it has asked for more for `upscale_delay_s`, or at once the mean
    over `panic_window_s` when that is `panic_threshold` x what the ready replicas should
    carry (Knative's panic mode: no scale-down until `stable_window_s` without panic).
    Scale-down takes the highest recommendation of the last `downscale_delay_s` (Kubernetes
    HPA's stabilisation window) and waits that long after any change.  Starting replicas
    count as capacity, so a burst is not answered twice.  After a scale-up has settled
    (`gain_settle_s`), the pool's served rate over `gain_window_s` is compared with the rate
    before it: replicas that added under `gain_share` of one replica's rate each while the
    queue grew are taken back, and scale-ups above that count are held for
    `saturation_cooldown_s` (rag/cluster/gain.py).
    """

    replica_variant: str = "batched"  # what each replica runs: batched | continuous
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    target_rps_per_replica: float = 0.0  # > 0: also size by request rate, the larger wins
    check_interval_s: float = 1.0
    stable_window_s: float = 20.0
    panic_window_s: float = 3.0
    panic_threshold: float = 2.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    gain_share: float = 0.25  # a replica adding less of one replica's rate is no gain (0: off)
    gain_settle_s: float = 5.0  # after a scale-up's replicas are ready, before measuring
    gain_window_s: float = 10.0  # the served rate is measured over this
    saturation_cooldown_s: float = 120.0  # scale-ups above a knee held this long (doubling)
    policy: str = "least_outstanding"  # least_outstanding | round_robin | power_of_two
    launcher: str = "local"  # local | slurm
    health_interval_s: float = 0.5
    replica_start_timeout_s: float = 300.0
    hop_timeout_s: float = 75.0  # balancer -> replica, per request
    max_connections: int = 0  # client connections at the balancer (0: as open files allow)
    gpus: str = ""  # local: GPU ids given round robin ("" = CUDA_VISIBLE_DEVICES, if any)
    mps_thread_percentage: int = 0  # local: CUDA MPS share per replica (0 = MPS not asked)
    slurm: SlurmReplicaConfig = field(default_factory=lambda: SlurmReplicaConfig())


@dataclass
class SlurmReplicaConfig:
    """Where replica jobs go when `launcher=slurm` (each one job with one GPU);
    conf/variant/scaling.yaml takes partition, account, qos and setup from `site`; null
    leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str = "gpu:1"  # "": no generic resource (CPU replicas)
    cpus_per_task: int = 4
    mem_gb: int = 16
    time_min: int = 120
    setup: list[str] = field(default_factory=list)  # shell lines run before the replica


@dataclass
class ServerConfig:
    """Input limits and lifecycle of one server process."""

    max_query_chars: int = 2000
    k_default: int = 2
    k_max: int = 10
    max_connections: int = 0  # open connections (0: as many as the open-files limit allows)
    head_timeout_s: float = 10.0  # a connection must send a full request head within this
    body_timeout_s: float = 10.0  # and then the whole body within this (408 if not)
    drain_timeout_s: float = 30.0
    # The most tokens a request may ask for (`max_tokens`); 0 = model.max_new_tokens, which
    # is also what a request that does not ask gets.
    max_tokens_limit: int = 0
    warmup: bool = True
    log_level: str = "warning"
    replica_id: str = ""  # set by the scaling variant's launcher; answers then name it


@dataclass
class HarnessConfig:
    """How the sweep runs one point: start the variant, warm it up, load it, stop it."""

    warmup_requests: int = 4  # sent one at a time before the measured run
    ready_timeout_s: float = 600.0  # start-up, including a first dequantisation
    stop_timeout_s: float = 30.0  # SIGTERM (drain), then SIGKILL


@dataclass
class SloConfig:
    """Latency targets.  `+search=max_rps` wants p99 latency (from the scheduled send)
    within `p99_s` with few failures, and the p99 of each token objective given within
    it; every run counts goodput: requests/s that met each objective given (0 = none)."""

    p99_s: float = 2.0
    max_failed_fraction: float = 0.01
    ttft_s: float = 0.0  # time to first token, from the scheduled send
    tpot_s: float = 0.0  # time per output token after the first
    e2e_s: float = 0.0  # latency, from the scheduled send


@dataclass
class SearchConfig:
    """`+search=max_rps`: the highest offered rate that meets `slo`, by doubling from
    `start_rps` until a trial misses, then bisecting until the bracket is narrower than
    `resolution` (a fraction of the rate).  One server serves every trial of a point."""

    name: str = "max_rps"
    start_rps: float = 1.0
    min_rps: float = 0.25
    max_rps: float = 128.0
    resolution: float = 0.1
    trial_duration_s: float = 20.0
    min_trial_requests: int = 20
    max_trials: int = 12


@dataclass
class SiteConfig:
    """Site settings for a SLURM cluster, kept in the git-ignored `conf/local/default.yaml`
    (see `slurm/README.md`); null leaves the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines before a job (module load)


@dataclass
class Config:
    variant: VariantConfig = field(default_factory=VariantConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = pick a free port and report it
    port_file: str = ""  # where to write the chosen port, for a parent process
    run_dir: str = ""  # where a server writes its logs and CSVs ("" = a temporary folder)
    # The sweep's axes (conf/config.yaml copies them into `load`):
    rps: float = 1.0  # offered requests per second
    timing_mode: str = "poisson"  # ideal | poisson | gamma | trace
    num_requests: int = 0  # requests per point (0 = as many as fit `duration`)
    duration: float = 30.0  # seconds of schedule per point (0 = no limit)
    seed: int = 0  # the schedule, the query draw and the generator's sampling
    tag: str = "default"  # names the sweep: outputs/<tag>/, a column of every CSV row
    target: str = ""  # variant=external: the URL of a server the sweep does not start
    api: str = "rag"  # rag | openai-chat | openai-completions: what the load generator speaks
    model_name: str = ""  # OpenAI APIs: the model to ask for ("" = the first /v1/models lists)
    load: LoadConfig = field(default_factory=LoadConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    search: SearchConfig | None = None  # set by +search=max_rps
    site: SiteConfig = field(default_factory=SiteConfig)


POINT_NAME_FIRST = ("variant", "rps", "timing_mode", "model")  # the main axes lead the name


def point_name(override_dirname: str) -> str:
    """A sweep point's folder name: its short overrides (paths left out) as `key-value`
    joined by `_`, then a hash of them all, so one set of overrides always names one
    folder (and a finished one is found).  No `=` or `,`: the folder is passed on in
    overrides (`run_dir=...`), where those characters would need quoting."""
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    items = [i for i in override_dirname.split(",") if "/" not in i and len(i) <= 32]
    items.sort(key=lambda i: POINT_NAME_FIRST.index(k) if (k := i.split("=")[0])
               in POINT_NAME_FIRST else len(POINT_NAME_FIRST))  # fmt: skip
    short = "_".join(item.replace("=", "-", 1) for item in items)
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "", short)[:100] or "defaults"
    return f"{readable}-{digest}"


def register_configs() -> None:
    """Register the schemas (the YAML tree's defaults list names `schema`) and the
    resolver that names a sweep point's folder."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    if not OmegaConf.has_resolver("ragbench_point"):
        OmegaConf.register_new_resolver("ragbench_point", point_name)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config tree the way `python -m ...` entry points do, without Hydra's
    output directories or logging takeover (a server needs neither)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def compose_from_argv(argv: list[str] | None = None) -> DictConfig:
    """Compose from command-line overrides, printing Hydra's own error on a bad one."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = sys.argv[1:] if argv is None else argv
    try:
        return compose(args)
    except (HydraException, OmegaConfBaseException) as exc:
        sys.exit(f"config error: {exc}")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
