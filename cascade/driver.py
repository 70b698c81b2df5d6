"""The single controller: plan every step of the cascade with its identity, then run each step not yet committed.

    python -m cascade +stage=4b models=tiny      # plans 1b -> 4b, runs what is missing, skips the rest

Planning needs no Ray and no model: each step's key is a hash of the config and the keys of its inputs, so a
changed setting re-runs that step and those downstream, and a run with nothing to do ends before Ray starts.
Stages are resolved like make: a stage's teachers (and theirs) are planned first. Per stage:

    generate (stages/generate.py) -> curate (stages/curate.py) -> train + fuse (stages/train.py)
    -> evaluate (stages/evaluate.py)

The driver owns the loop and all run state (the manifest); Ray actors and Ray Train workers only hold weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cascade import cluster
from cascade.config import Config, ConfigError
from cascade.prompts import Prompt, file_digest, load_prompts, read_text
from cascade.rundir import RunDir, stable_hash

log = logging.getLogger("cascade.driver")


@dataclass
class Teacher:
    name: str  # the stage whose model answers ("1b"), or "<root>-base" when the root teacher is being built
    model: str  # local directory or HF id
    key: str  # identity of its weights
    weight: float = 1.0
    system: str | None = None  # the kernel, in context, when building the root teacher
    revision: str | None = None


@dataclass
class GenJob:
    teacher: Teacher
    data: str
    key: str
    path: str
    shard_size: int


@dataclass
class PhasePlan:
    index: int
    name: str
    data: str
    iters: int
    lr: float
    dataset_key: str
    dataset_path: str
    key: str  # of the fused model after this phase
    path: str


@dataclass
class StagePlan:
    name: str
    base_model: str
    base_key: str
    revision: str | None
    teachers: list[Teacher] = field(default_factory=list)
    gen_jobs: list[GenJob] = field(default_factory=list)
    phases: list[PhasePlan] = field(default_factory=list)
    eval_key: str = ""
    eval_path: str = ""

    @property
    def trains(self) -> bool:
        return bool(self.phases)

    @property
    def final_model(self) -> str:
        return self.phases[-1].path if self.phases else self.base_model

    @property
    def final_key(self) -> str:
        return self.phases[-1].key if self.phases else self.base_key


# -- planning (no Ray, no models) -------------------------------------------------------------------------------
def needed_stages(cfg: Config) -> list[str]:
    """The target and, transitively, every stage it learns from, lowest first."""
    need, todo = set(), [cfg.target]
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(t.stage for t in cfg.stages[s].teachers)
    return [s for s in cfg.stage_order() if s in need]


def _looks_local(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(model))


def model_identity(cfg: Config, stage: str) -> tuple[str, str]:
    """(path or id, key) of a stage's base model; raises ConfigError when a local path is missing."""
    spec = cfg.stages[stage]
    if spec.model.startswith("tiny:"):
        from cascade.tiny import preset_dir, preset_key

        size = spec.model.split(":", 1)[1]
        if cfg.models.preset != "tiny" or size not in cfg.models.tiny.sizes:
            raise ConfigError(f"stages.{stage}.model={spec.model!r}: no such tiny model (use models=tiny)")
        return str(preset_dir(cfg) / size), stable_hash("tiny", preset_key(cfg), size)
    if _looks_local(spec.model):
        p = Path(spec.model).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError(f"stages.{stage}.model: model path not found (no config.json): {spec.model}")
        files = sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.is_file())
        return str(p.resolve()), stable_hash("local", (p / "config.json").read_text(), files)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec.model, "config.json", revision=spec.revision), str):
            raise ConfigError(f"stages.{stage}.model: {spec.model!r} is not in the local HF cache (HF_HUB_OFFLINE=1)")
    return spec.model, stable_hash("hub", spec.model, spec.revision)


def shard_size_for(cfg: Config, n_prompts: int) -> int:
    """Prompts per shard. generation.shard_size when set; auto (0): large enough to fill one engine batch
    (hf: backend.batch_size; vllm: engine_kwargs.max_num_seqs, 256 by default), otherwise N / (8 x replicas) so
    every replica gets about 8 shards and a crash redoes at most ~1/8 of its share; never above N."""
    g, b = cfg.generation, cfg.backend
    if g.shard_size:
        return g.shard_size
    batch = b.batch_size if b.name == "hf" else int(b.engine_kwargs.get("max_num_seqs", 256))
    return max(1, min(n_prompts, max(batch, -(-n_prompts // (8 * g.replicas)))))


def plan(cfg: Config, rd: RunDir, prompts: dict[str, list[Prompt]], kernel: str) -> list[StagePlan]:
    g = cfg.generation
    sampling = {k: getattr(g, k) for k in ("max_new_tokens", "temperature", "top_p", "n_samples", "logprobs")}
    # resources and fault tolerance do not change what is trained
    train_id = dataclasses.replace(cfg.train, num_workers=1, use_gpu=False, cpus_per_worker=1, save_every=0,
                                   keep_checkpoints=0, max_failures=0)
    b = cfg.backend  # outputs depend on the engine; hf's batch composition changes the sampled tokens
    backend_id = (b.name, b.dtype, b.batch_size if b.name == "hf" else None)
    data_ids = {k: (file_digest(cfg.data[k].path), dataclasses.asdict(cfg.data[k])) for k in prompts}
    done: dict[str, StagePlan] = {}
    for stage in needed_stages(cfg):
        spec = cfg.stages[stage]
        base_model, base_key = model_identity(cfg, stage)
        sp = StagePlan(stage, base_model, base_key, spec.revision)
        if spec.teachers:
            sp.teachers = [
                Teacher(t.stage, done[t.stage].final_model, done[t.stage].final_key, t.weight,
                        revision=None if done[t.stage].trains else done[t.stage].revision)
                for t in spec.teachers
            ]
        elif spec.build:  # context distillation: the base answers with the kernel in context
            sp.teachers = [Teacher(f"{stage}-base", base_model, base_key, 1.0, kernel, spec.revision)]
        if sp.teachers:
            for t in sp.teachers:
                for data in dict.fromkeys(p.data for p in cfg.curriculum):
                    shard = shard_size_for(cfg, len(prompts[data]))
                    key = stable_hash("gen", t.key, t.system, sampling, shard, backend_id, cfg.seed, data_ids[data])
                    sp.gen_jobs.append(GenJob(t, data, key, rd.path("generations", t.name, data, key), shard))
            prev = base_key
            for i, ph in enumerate(cfg.curriculum):
                gens = [(j.teacher.name, j.teacher.weight, j.key) for j in sp.gen_jobs if j.data == ph.data]
                curation = (g.drop_truncated, g.min_chars, g.max_chars)
                dkey = stable_hash("data", stage, ph.name, gens, cfg.seed, curation)
                tkey = stable_hash("train", prev, dkey, ph, train_id, cfg.seed)
                sp.phases.append(PhasePlan(
                    i, ph.name, ph.data, ph.iters, ph.lr, dkey, rd.path(stage, "dataset", ph.name),
                    tkey, rd.path(stage, "train", f"{i:02d}-{ph.name}"),
                ))
                prev = tkey
            sp.eval_key = stable_hash("eval", base_key, prev, [p.dataset_key for p in sp.phases], cfg.eval)
            sp.eval_path = rd.path(stage, "eval")
        done[stage] = sp
    return list(done.values())


def pending_steps(rd: RunDir, plans: list[StagePlan]) -> list[str]:
    out = []
    for sp in plans:
        out += [f"generate {j.teacher.name}/{j.data}" for j in sp.gen_jobs if not rd.committed(j.path, j.key)]
        out += [f"{sp.name}/dataset/{p.name}" for p in sp.phases if not rd.committed(p.dataset_path, p.dataset_key)]
        out += [f"{sp.name}/train/{p.name}" for p in sp.phases if not rd.committed(p.path, p.key)]
        if sp.trains and not rd.committed(sp.eval_path, sp.eval_key):
            out.append(f"{sp.name}/eval")
    return out


# -- running ------------------------------------------------------------------------------------------------------
def _log_to_file(rd: RunDir) -> None:
    if rd.is_local:
        (rd.local("logs")).mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(rd.local("logs", "driver.log"))
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(h)


def _save_config(rd: RunDir, cfg: Config) -> None:
    """The resolved config next to the outputs. It holds no secret: tokens are read from the environment only."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    rd.write_bytes(rd.path("config.yaml"), text.encode())
    rd.write_bytes(rd.path("config.sha256"), stable_hash(text).encode())


def run(cfg: Config) -> list[StagePlan]:
    """Validate inputs, plan, and run every missing step up to cfg.target. Returns the plans."""
    # Inputs first: every file is read and checked before Ray starts or a model loads.
    used = list(dict.fromkeys(p.data for p in cfg.curriculum))
    prompts = {k: load_prompts(cfg.data[k]) for k in used}
    kernel = read_text(cfg.kernel)
    rd = RunDir(cfg.run_dir)
    _log_to_file(rd)
    plans = plan(cfg, rd, prompts, kernel)
    todo = list(dict.fromkeys(pending_steps(rd, plans)))  # a teacher's answers shared by two stages: once
    if not todo:
        log.info("nothing to do: every step up to stage %s is committed in %s", cfg.target, cfg.run_dir)
        _report(plans)
        return plans
    log.info("stages %s; %d steps to run: %s", [p.name for p in plans], len(todo), ", ".join(todo))
    _save_config(rd, cfg)
    if cfg.models.preset == "tiny":
        from cascade.tiny import build_preset

        build_preset(cfg)  # cached; committed by rename
    token = os.environ.get(cfg.hf_token_env)
    if token:
        os.environ.setdefault("HF_TOKEN", token)  # workers inherit it; never written to config or logs

    if cfg.cluster.auth:
        cluster.ensure_auth_token()  # before the first `import ray`
    from stages import curate, evaluate, generate, train

    cluster.start(cfg.cluster)
    try:
        rd.clean_staging()
        for sp in plans:
            if not sp.trains:
                log.info("stage %s: teacher %s used as is", sp.name, sp.base_model)
                continue
            generate.run(rd, cfg, sp, prompts)
            for ph in sp.phases:
                rd.step(f"{sp.name}/dataset/{ph.name}", ph.dataset_key, ph.dataset_path,
                        lambda staging, ph=ph: curate.run(staging, cfg, sp, ph, prompts[ph.data], rd))
            # the base student's score does not wait for the curriculum: it runs while the first phase trains
            before = None if rd.committed(sp.eval_path, sp.eval_key) else evaluate.start_before(cfg, sp, rd)
            train.run(rd, cfg, sp)
            rd.step(f"{sp.name}/eval", sp.eval_key, sp.eval_path,
                    lambda staging: evaluate.run(staging, cfg, sp, rd, before))
    finally:
        cluster.stop()
    _report(plans)
    return plans


def _report(plans: list[StagePlan]) -> None:
    for sp in plans:
        if sp.trains:
            m = Path(sp.eval_path, "metrics.json")
            agreement = json.loads(m.read_text())["agreement"] if m.exists() else {}
            log.info("stage %s: student %s; agreement %s", sp.name, sp.final_model, agreement)
