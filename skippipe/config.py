"""Typed run configuration: omegaconf structured dataclasses, YAML values, key=value overrides.

The dataclasses below are the schema. ``load_config(path, overrides)`` merges, in order: the
schema defaults, the YAML file, then the command-line ``key=value`` overrides, and runs the
cross-field checks once. Every user mistake becomes a :class:`~skippipe.errors.ConfigError` with one
line that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: F401
from omegaconf import errors as oc_errors

from skippipe.errors import ConfigError
from skippipe.fileio import absent
from skippipe.plan import stages_visited  # noqa: F401 (the formula lives with the path rules)

LAUNCHERS = ("inprocess", "local", "ray")
METHODS = ("full", "random_skip", "skippipe_nc", "skippipe")
VERIFY_LEVELS = ("off", "states", "full")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DATA_SOURCES = ("stdlib", "files", "tokens", "hf")
TOKENIZERS = ("bytes", "bpe", "hf")
PRECISIONS = ("fp32", "bf16", "fp16")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("auto", "gloo", "nccl")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups
HOST_MEMORY = ("retain", "system")  # runtime.host_memory (skippipe.process.set_host_memory)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny, llama-500m, llama-1.5b, llama-8b (skippipe.model.presets)
    dim: Optional[int] = None  # None: the preset's value
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary size
    seq_len: Optional[int] = None  # tokens per sample; None: the preset's context length
    init_std: float = 0.02
    rope_theta: float = 10000.0
    n_kv_heads: Optional[int] = None  # grouped-query attention: key/value heads; None: model.n_heads
    norm_eps: float = 1e-6  # RMSNorm epsilon
    hf_path: Optional[str] = None  # a local Hugging Face LLaMA-family directory (config.json + *.safetensors): shape and initial weights


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib (Python's own sources, offline), files, tokens, hf
    path: Optional[str] = None  # files: a path or glob of text files; tokens: a .bin/.npy token file
    token_dtype: str = "uint16"  # for source=tokens with a raw .bin file: uint16 or uint32
    hf_name: Optional[str] = None  # for source=hf: dataset name or local dataset directory
    hf_split: str = "train"
    hf_text_field: str = "text"
    tokenizer: str = "bytes"  # bytes (vocab 256), bpe (trained locally with `tokenizers`, cached) or hf (data.hf_tokenizer)
    hf_tokenizer: Optional[str] = None  # for tokenizer=hf: a local directory holding tokenizer.json (or the file itself)
    bpe_vocab_size: int = 2048
    max_corpus_mb: float = 8.0  # cap on the text read for the default corpus and for files
    val_fraction: float = 0.05
    cache_dir: Optional[str] = None  # None: $SKIPPIPE_CACHE or ~/.cache/skippipe


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    lr_steps: Optional[int] = None  # horizon of the warmup + cosine schedule (lr stays at its floor after it); None: train.steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip by global norm over all stages; 0 disables
    samples_per_microbatch: int = 8
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    device: str = "cpu"  # cpu, cuda, or auto
    precision: str = "fp32"  # fp32, bf16 (autocast, fp32 master weights) or fp16 (autocast + loss scaling)
    activation_checkpointing: str = "none"  # none, full (recompute each stage's forward in backward) or every_k (every k-th block, e.g. every_2)
    loss_scale: float = 65536.0  # fp16: the initial loss scale (halved on overflow, doubled after loss_scale_window good steps)
    loss_scale_window: int = 200  # fp16: good steps in a row before the loss scale doubles


@dataclass
class ScheduleConfig:
    method: str = "skippipe"  # full, random_skip, skippipe_nc, skippipe
    num_stages: int = 4  # ignored when partition_sizes is given (its length wins)
    skip_ratio: float = 0.25  # (S - L) / S: L stages are visited per microbatch, stage 0 included
    partition_sizes: List[int] = field(default_factory=list)  # replicas per stage, stage 0 first
    memory: Optional[int] = 3  # microbatches in flight per node (TC1); null: as many as the smallest node's memory_gb holds (cost model)
    microbatches_per_originator: int = 2  # per stage-0 node per iteration
    max_swaps: int = 2  # SkipPipe rule 2: at most this many reorders per path
    max_swap_distance: int = 1  # a swap goes back at most this many stages below the highest
    max_jump: int = 4  # no jump of more than this many stages past the highest visited
    routes_from: Optional[str] = None  # a run directory whose routes.jsonl is replayed
    replan_every: int = 0  # 0: re-plan only when the live state changes; k: also every k steps
    seed: Optional[int] = None  # routing seed; None: run.seed
    search_budget_s: float = 300.0  # safety cap on the routing search (normally ends by its fixed attempt count)
    allocation_budget_s: float = 120.0  # safety cap on the allocation search (normally ends by its move count)
    allocation: str = "auto"  # auto: judged by the routed plan for skippipe, DT-FM for the baselines; dtfm; plan


@dataclass
class TopologyConfig:
    file: Optional[str] = None  # a topology YAML; replaces the inline description below
    regions: Optional[Any] = None  # inline {names, latency_ms, bandwidth_gbps}
    nodes: Optional[Any] = None  # inline list of {name, region, speed, memory_gb}
    generate: Optional[Any] = None  # {count, placement: round_robin|random|single, seed, regions_file}


@dataclass
class CostConfig:
    fwd_s_per_sample_layer: Optional[float] = None  # None: from model FLOPs and node speed
    flops_per_s: float = 5e10  # effective FLOP/s of a node with speed 1.0 (for the FLOP model)
    bwd_factor: float = 1.5
    loss_factor: float = 0.25
    message_overhead_s: float = 0.0  # added to every off-node transfer (the paper used 0.35)
    bytes_per_element: Optional[int] = None  # bytes per activation element on the wire; None: of train.precision (4 fp32, 2 bf16/fp16)
    emulate_links: bool = True  # runtime: delay messages by latency + bytes / bandwidth
    measured_ewma: float = 0.3  # weight of a new measurement in the smoothed cost
    grad_sync: bool = True  # simulate each stage's gradient all-reduce after its last backward


@dataclass
class RunConfig:
    name: Optional[str] = None  # None: the config file's stem
    dir: Optional[str] = None  # output directory; None: runs/<name>
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # a new run over an existing one in run.dir: remove its outputs first
    log_level: str = "info"
    threads: int = 1  # torch threads per rank; bitwise determinism holds at a fixed count


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; or disabled
    project: str = "skippipe"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    log_every: int = 1


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: no periodic checkpoints
    keep: int = 3


@dataclass
class VerifyConfig:
    level: str = "states"  # off, states (params, optimizer, data, routes), full (+ activations)


@dataclass
class KillConfig:
    step: Optional[int] = None
    node: Optional[str] = None


@dataclass
class CorruptConfig:
    step: Optional[int] = None
    node: Optional[str] = None
    tensor: str = "param"  # param, grad, act, or op (the output of operator `op`)
    op: str = "blocks.0.down"  # for tensor=op: the module (inside the stage) whose output is perturbed


@dataclass
class FaultConfig:
    kill: KillConfig = field(default_factory=KillConfig)  # the node's process exits at that step
    error: KillConfig = field(default_factory=KillConfig)  # the node's worker raises at that step
    slow_nodes: Dict[str, float] = field(default_factory=dict)  # node name -> slowdown factor
    replace: bool = False  # start a new process/actor for a dead node; it joins when ready
    rebuild: str = "init"  # a stage with no live replica restarts from: init (seeded), checkpoint or checkfree
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
    slow_threshold: float = 2.0  # a node this many times slower than the median node (3 steps running) is slow
    slow_until: Optional[int] = None  # fault.slow_nodes stop at this step (a transient slowdown); None: never
    probe_after: int = 20  # steps a slow node (or link) left without work waits before it is tried again (0: never)
    slow_links: Dict[str, float] = field(default_factory=dict)  # "n0-n1" -> factor: emulated link that much slower
    slow_links_from: Optional[int] = None  # fault.slow_links start at this step; None: from the start
    slow_links_until: Optional[int] = None  # fault.slow_links stop at this step; None: never
    heartbeat_s: float = 2.0


@dataclass
class RuntimeConfig:
    backend: str = "auto"  # auto (nccl with CUDA, else gloo), gloo, nccl
    timeout_s: float = 60.0  # every blocking receive and collective
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None  # None: a free port
    host_memory: str = "retain"  # retain: freed host memory stays in each process (glibc malloc thresholds raised, no page faults per step); system: the C library defaults


@dataclass
class JoinTemplate:
    stage: str = "auto"  # auto (the stage with the fewest live replicas) or a stage index
    region: str = "from-label"  # from-label (the Ray node's label named by region_label) or a region name
    region_label: str = "region"  # the Ray node label that names its region (region: from-label)
    speed: float = 1.0  # the new node's relative compute speed
    memory_gb: float = 80.0  # the new node's memory (the stage must fit)
    name_prefix: str = "ray"  # the new node's name: <name_prefix>-<first 6 hex digits of the Ray node id>


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: a local ray.init()
    placement_strategy: str = "PACK"  # PACK on one box, SPREAD across machines
    use_gpu: bool = False
    num_cpus_per_worker: Optional[float] = None  # CPUs per worker actor; None: 1, or what the cluster's free CPUs allow
    storage_path: Optional[str] = None  # where Ray runs write <run.name>/ when run.dir is unset; None: ./runs, or ~/skippipe_runs inside ray job submit
    autojoin: bool = False  # a Ray node that joins the cluster during the run becomes a new node (as skippipe join)
    join_template: JoinTemplate = field(default_factory=lambda: JoinTemplate())  # what such a node is


@dataclass
class Config:
    launcher: str = "inprocess"  # inprocess, local, ray
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------
# loading


def _valid_keys(node: Any, prefix: str = "") -> List[str]:
    """Dotted names of every leaf key under a dataclass type (for 'unknown key' messages)."""
    keys = []
    for f in dataclasses.fields(node):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.extend(_valid_keys(type(default), name + "."))
        else:
            keys.append(name)
    return keys


def valid_keys() -> List[str]:
    return _valid_keys(Config)


def _unknown_key_message(full_key: str) -> str:
    keys = valid_keys()
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    siblings = [k for k in keys if parent and k.startswith(parent + ".")]
    if siblings:
        return f"unknown config key '{full_key}'; valid keys under '{parent}': {', '.join(sorted(siblings))}"
    groups = sorted({k.split(".")[0] for k in keys})
    return f"unknown config key '{full_key}'; top-level keys are: {', '.join(groups)}"


def _omegaconf_error(err: Exception, origin: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or ""
    if isinstance(err, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
        return ConfigError(f"{origin}: {_unknown_key_message(full_key)}")
    if isinstance(err, oc_errors.ValidationError):
        value = getattr(err, "msg", str(err)).splitlines()[0]
        return ConfigError(f"{origin}: bad value for '{full_key}': {value}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]}")


# fields whose values are free-form mappings: any sub-key is allowed under them
_OPEN_FIELDS = ("fault.slow_nodes", "fault.slow_links", "topology.regions", "topology.nodes", "topology.generate")


def _check_override_key(key: str) -> None:
    key = key.lstrip("+~")
    keys = set(valid_keys())
    if key in keys or any(key.startswith(open_ + ".") for open_ in _OPEN_FIELDS):
        return
    groups = {k.split(".")[0] for k in keys}
    if key in groups:
        raise ConfigError(f"'{key}' is a config group, not a value; set one of its keys, e.g. "
                          f"{next(k for k in sorted(keys) if k.startswith(key + '.'))}=...")
    raise ConfigError(f"command line: {_unknown_key_message(key)}")


def parse_overrides(overrides: List[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override '{item}': write key=value, e.g. train.steps=20")
        _check_override_key(item.split("=", 1)[0])
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:  # omegaconf grammar errors
        raise ConfigError(f"bad override: {str(err).splitlines()[0]}") from None


def split_config_arg(items) -> Tuple[Optional[str], List[str]]:
    """``[CONFIG] key=value ...`` as every entry point takes it (``skippipe train``, torchrun's and
    Ray's launch scripts): a first argument without ``=`` is the config file, the rest overrides."""
    items = list(items)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Build and check a Config from an optional YAML file and ``key=value`` overrides."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    stem = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' {absent(p)}; pass an existing YAML, e.g. configs/tiny.yaml")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file '{path}' must hold a mapping of config groups")
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except Exception as err:
            raise _omegaconf_error(err, path) from None
        stem = p.stem
    dotlist = parse_overrides(list(overrides or []))
    # topology.file given on the command line replaces whatever topology the file describes
    if OmegaConf.select(dotlist, "topology.file") is not None:
        cfg.topology.regions = None
        cfg.topology.nodes = None
        cfg.topology.generate = None
    try:
        cfg = OmegaConf.merge(cfg, dotlist)
    except Exception as err:
        raise _omegaconf_error(err, "command line") from None
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if obj.run.name is None:
        obj.run.name = stem or "default"
    if path is not None and obj.topology.file:
        obj.topology.file = _resolve_near(obj.topology.file, Path(path))
    check_config(obj)
    return obj


def _resolve_near(relative: str, config_path: Path) -> str:
    """A path in a config file is taken from the working directory, else from the config file's
    folder or the folders above it (``configs/topology/geo2.yaml`` works from anywhere)."""
    candidate = Path(relative).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    for folder in list(config_path.resolve().parents)[:3]:
        if (folder / candidate).exists():
            return str(folder / candidate)
    return relative


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: Dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a saved runs/<name>/config.yaml)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except Exception as err:
        raise _omegaconf_error(err, "saved config") from None
    obj: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check_config(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# cross-field checks


def num_stages(cfg: Config) -> int:
    from skippipe.plan import num_stages as of_schedule

    return of_schedule(cfg.schedule)


def _choice(value: str, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}; set {key} to one of them")


def _positive(value, key: str, fix: str = "") -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value} must be > 0{'; ' + fix if fix else ''}")


def _above(low):
    return (lambda v: v > low), f"> {low}"


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _within(low, high, open_high: bool = False, open_low: bool = False):
    def test(v):
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    return test, f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


# key -> (test, what it must be, may it be null): the numeric ranges checked once at startup; the
# error names the key, the range, what a special value means (_RANGE_NOTES) and the default
_RANGES = {
    "train.lr": (*_above(0), False),
    "train.steps": (*_at_least(0), False),
    "train.eval_every": (*_at_least(0), False),
    "train.samples_per_microbatch": (*_at_least(1), False),
    "train.loss_scale": (*_above(0), False),
    "train.loss_scale_window": (*_at_least(1), False),
    "data.val_fraction": (*_within(0, 1, open_low=True, open_high=True), False),
    "schedule.microbatches_per_originator": (*_at_least(1), False),
    "schedule.memory": (*_at_least(1), True),
    "runtime.timeout_s": (*_above(0), False),
    "fault.heartbeat_s": (*_above(0), False),
    "fault.probe_after": (*_at_least(0), False),
    "fault.slow_until": (*_at_least(0), True),
    "model.init_std": (*_above(0), False),
    "model.norm_eps": (*_above(0), False),
    "model.rope_theta": (*_above(0), False),
    "data.bpe_vocab_size": (*_at_least(256), False),  # the byte alphabet comes first
    "data.max_corpus_mb": (*_above(0), False),
    "train.min_lr_ratio": (*_within(0, 1), False),
    "train.warmup_steps": (*_at_least(0), False),
    "train.lr_steps": (*_at_least(1), True),
    "train.weight_decay": (*_at_least(0), False),
    "train.beta1": (*_within(0, 1, open_high=True), False),
    "train.beta2": (*_within(0, 1, open_high=True), False),
    "train.eps": (*_above(0), False),
    "train.grad_clip": (*_at_least(0), False),
    "train.eval_batches": (*_at_least(1), False),
    "schedule.max_swaps": (*_at_least(0), False),
    "schedule.max_swap_distance": (*_at_least(0), False),
    "schedule.max_jump": (*_at_least(1), False),
    "schedule.replan_every": (*_at_least(0), False),
    "schedule.search_budget_s": (*_above(0), False),
    "schedule.allocation_budget_s": (*_above(0), False),
    "cost.fwd_s_per_sample_layer": (*_above(0), True),
    "cost.flops_per_s": (*_above(0), False),
    "cost.bwd_factor": (*_at_least(0), False),
    "cost.loss_factor": (*_at_least(0), False),
    "cost.message_overhead_s": (*_at_least(0), False),
    "cost.bytes_per_element": (*_at_least(1), True),
    "cost.measured_ewma": (*_within(0, 1), False),
    "tracking.log_every": (*_at_least(1), False),
    "checkpoint.every": (*_at_least(0), False),
    "checkpoint.keep": (*_at_least(1), False),
    "fault.slow_threshold": (*_above(1), False),
    "runtime.master_port": (*_within(1, 65535), True),
    "ray.num_cpus_per_worker": (*_above(0), True),
}
_RANGE_NOTES = {
    "train.eval_every": "0: validate only at the end",
    "schedule.microbatches_per_originator": "every stage-0 node starts at least one microbatch per iteration",
    "schedule.memory": "a node holds at least one microbatch; null: derive it from memory_gb",
    "fault.probe_after": "0: never try a slow node again",
    "fault.slow_until": "null: slow until the end",
}


def _check_ranges(cfg: Config) -> None:
    """Every number in :data:`_RANGES` is finite and in its range (null only where it may be)."""
    defaults = Config()
    for key, (ok, must, nullable) in _RANGES.items():
        value = _lookup(cfg, key)
        if value is None and nullable:
            continue
        if value is None or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
            default = _lookup(defaults, key)
            note = f" ({_RANGE_NOTES[key]})" if key in _RANGE_NOTES else ""
            raise ConfigError(f"{key}={value} must be {must}{' or null' if nullable else ''}{note}; "
                              f"the default is {key}={'null' if default is None else default}")


def _lookup(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_config(cfg: Config) -> None:
    """Cross-field checks, once at startup; each failure names the key, the numbers and the fix."""
    from skippipe.model.presets import resolve_model_spec

    _check_choices(cfg)
    _check_ranges(cfg)
    _check_numbers(cfg)
    stages = num_stages(cfg)
    _positive(stages, "schedule.num_stages")
    spec = resolve_model_spec(cfg.model)  # the shape; the vocabulary comes with the data
    if stages > spec.n_layers:
        raise ConfigError(
            f"{stages} stages > model.n_layers={spec.n_layers}: every stage needs a layer; "
            f"set schedule.num_stages <= {spec.n_layers} or raise model.n_layers")
    if not 0.0 <= cfg.schedule.skip_ratio < 1.0:
        raise ConfigError(f"schedule.skip_ratio={cfg.schedule.skip_ratio} must be in [0, 1)")
    visited = stages_visited(stages, cfg.schedule.skip_ratio)
    if visited < 2 and stages >= 2:
        raise ConfigError(
            f"schedule.skip_ratio={cfg.schedule.skip_ratio} leaves {visited} of {stages} stages per "
            f"microbatch; at least 2 must be visited: lower schedule.skip_ratio")
    _check_paths(cfg)
    _check_fault(cfg)
    _check_run(cfg)


def _check_choices(cfg: Config) -> None:
    """Every key with a fixed set of values holds one of them (a YAML boolean false reads as verify.level=off)."""
    if cfg.verify.level in ("False", "false"):  # YAML reads a bare `off` as the boolean false
        cfg.verify.level = "off"
    _choice(cfg.launcher, LAUNCHERS, "launcher")
    _choice(cfg.schedule.method, METHODS, "schedule.method")
    _choice(cfg.schedule.allocation, ("auto", "dtfm", "plan"), "schedule.allocation")
    _choice(cfg.verify.level, VERIFY_LEVELS, "verify.level")
    _choice(cfg.tracking.wandb.mode, WANDB_MODES, "tracking.wandb.mode")
    _choice(cfg.data.source, DATA_SOURCES, "data.source")
    _choice(cfg.data.tokenizer, TOKENIZERS, "data.tokenizer")
    _choice(cfg.train.precision, PRECISIONS, "train.precision")
    _choice(cfg.run.log_level, LOG_LEVELS, "run.log_level")
    _choice(cfg.runtime.host_memory, HOST_MEMORY, "runtime.host_memory")
    from skippipe.model.presets import checkpoint_interval

    checkpoint_interval(cfg.train.activation_checkpointing)
    _choice(cfg.fault.corrupt.tensor, ("param", "grad", "act", "op"), "fault.corrupt.tensor")
    _choice(cfg.fault.rebuild, ("init", "checkpoint", "checkfree"), "fault.rebuild")
    _choice(cfg.runtime.backend, BACKENDS, "runtime.backend")
    _choice(cfg.ray.placement_strategy, PLACEMENT_STRATEGIES, "ray.placement_strategy")


def _check_numbers(cfg: Config) -> None:
    """Combinations of numbers that contradict each other (single ranges: :data:`_RANGES`)."""
    if cfg.checkpoint.every > 0 and cfg.verify.level == "off":
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} needs the ledger (a checkpoint carries its hashes) "
                          "and verify.level=off keeps none; set verify.level=states, or checkpoint.every=0")
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError("run.resume=true and run.overwrite=true contradict each other; pass one of them")
    if any(size <= 0 for size in cfg.schedule.partition_sizes):
        raise ConfigError(f"schedule.partition_sizes={list(cfg.schedule.partition_sizes)} must be all > 0")


def _check_paths(cfg: Config) -> None:
    """The data, topology and route-log files the config names exist (and hf data names a dataset)."""
    if cfg.data.source in ("files", "tokens"):
        _check_data_path(cfg.data.path, f"data.path (data.source={cfg.data.source})")
    if cfg.data.source == "hf" and not cfg.data.hf_name:
        raise ConfigError("data.source=hf needs data.hf_name (a dataset name or a local dataset directory)")
    if cfg.data.tokenizer == "hf" and not cfg.data.hf_tokenizer:
        raise ConfigError("data.tokenizer=hf needs data.hf_tokenizer (a local directory holding tokenizer.json)")
    if cfg.topology.file is not None and not Path(cfg.topology.file).is_file():
        raise ConfigError(f"topology.file '{cfg.topology.file}' {absent(cfg.topology.file)}; "
                          "point it at a topology YAML such as configs/topology/geo2.yaml")
    if cfg.schedule.routes_from is not None and not (Path(cfg.schedule.routes_from) / "routes.jsonl").is_file():
        raise ConfigError(f"schedule.routes_from: '{cfg.schedule.routes_from}/routes.jsonl' does not exist; "
                          "point it at a finished run directory")


def _check_fault(cfg: Config) -> None:
    """The fault injections are well formed: factors in range, nodes and links named, pairs complete."""
    for node, factor in cfg.fault.slow_nodes.items():
        if factor <= 0:
            raise ConfigError(f"fault.slow_nodes.{node}={factor} must be > 0 (5.0 means five times slower)")
    _check_fault_nodes(cfg)
    _check_slow_links(cfg)
    if (cfg.fault.kill.step is None) != (cfg.fault.kill.node is None):
        raise ConfigError("fault.kill needs both step and node, e.g. fault.kill.step=5 fault.kill.node=n2")
    if (cfg.fault.error.step is None) != (cfg.fault.error.node is None):
        raise ConfigError("fault.error needs both step and node, e.g. fault.error.step=2 fault.error.node=n1")
    if (cfg.fault.corrupt.step is None) != (cfg.fault.corrupt.node is None):
        raise ConfigError("fault.corrupt needs both step and node, e.g. fault.corrupt.step=7 fault.corrupt.node=n2")
    injected = [key for key, on in (("fault.kill", cfg.fault.kill.step is not None),
                                    ("fault.error", cfg.fault.error.step is not None),
                                    ("fault.corrupt", cfg.fault.corrupt.step is not None),
                                    ("fault.slow_nodes", bool(cfg.fault.slow_nodes)),
                                    ("fault.slow_links", bool(cfg.fault.slow_links))) if on]
    if injected and cfg.launcher == "inprocess":
        raise ConfigError(f"{', '.join(injected)} inject faults into worker processes and launcher=inprocess "
                          "has none; set launcher=local (or launcher=ray)")


def _check_run(cfg: Config) -> None:
    """The run's thread count, name and Ray join template are valid."""
    if cfg.run.threads <= 0:
        raise ConfigError(f"run.threads={cfg.run.threads} must be >= 1")
    template = cfg.ray.join_template
    if str(template.stage) != "auto" and not str(template.stage).isdigit():
        raise ConfigError(f"ray.join_template.stage={template.stage!r} must be auto or a stage index, e.g. 1")
    _positive(template.speed, "ray.join_template.speed", "1.0 is a typical node")
    _positive(template.memory_gb, "ray.join_template.memory_gb")
    if cfg.run.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run.name):
        raise ConfigError(f"run.name={cfg.run.name!r} may hold only letters, digits, '.', '_' and '-'")


def _check_slow_links(cfg: Config) -> None:
    fault = cfg.fault
    for key in ("slow_links_from", "slow_links_until"):
        value = getattr(fault, key)
        if value is not None and value < 0:
            raise ConfigError(f"fault.{key}={value} must be a step >= 0, or null")
    if not fault.slow_links:
        return
    if not cfg.cost.emulate_links:
        raise ConfigError("fault.slow_links slows emulated links: set cost.emulate_links=true")
    from skippipe.topology import load_topology, split_link

    names = load_topology(cfg).names()
    for key, factor in fault.slow_links.items():
        if split_link(str(key), names) is None:
            raise ConfigError(f"fault.slow_links.{key}: not two node names joined by '-' (e.g. "
                              f"{names[0]}-{names[-1]}); nodes are {', '.join(names)}")
        if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ConfigError(f"fault.slow_links.{key}={factor} must be a number > 0 (10.0: ten times slower)")


def _check_fault_nodes(cfg: Config) -> None:
    """Injected faults must name nodes of the topology (a typo would silently inject nothing)."""
    named = {f"fault.{kind}.node": getattr(cfg.fault, kind).node for kind in ("kill", "error", "corrupt")}
    named.update({f"fault.slow_nodes.{n}": n for n in cfg.fault.slow_nodes})
    named = {k: v for k, v in named.items() if v is not None}
    if not named:
        return
    from skippipe.topology import load_topology

    nodes = load_topology(cfg).names()
    for key, node in named.items():
        if node not in nodes:
            raise ConfigError(f"{key}={node}: no such node in the topology; nodes are {', '.join(nodes)}")


def _check_data_path(path: Optional[str], key: str) -> None:
    import glob

    if not path:
        raise ConfigError(f"{key} is not set; give a file, directory or glob")
    if not glob.glob(str(Path(path).expanduser()), recursive=True):
        raise ConfigError(f"{key}: '{path}' does not exist; give an existing file, directory or glob")


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / str(cfg.run.name)
