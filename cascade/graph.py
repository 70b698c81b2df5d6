"""The plan of a run: every step of the cascade up to the target, its identity. No Ray, no model.

    python -m cascade +stage=4b models=tiny --cfg job     # the config the plan is made from

Each step's key is a hash of the config and the keys of its inputs, so a changed setting re-runs
that step and those downstream, and a run with nothing to do ends before Ray starts. Stages are
resolved like make: a stage's teachers (and theirs) first. The driver, the steps, the tests and the
benchmarks share these types; nothing here imports a step or the driver."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cascade import generation
from cascade import phases as phase_kinds
from cascade.config import Config, ConfigError
from cascade.generation.types import Sampling
from cascade.models import model_identity
from cascade.phases import identity as phase_identity
from cascade.prompts import Prompt, file_digest, load_prompts, read_text
from cascade.rundir import RunDir, Step, stable_hash


@dataclass
class Teacher:
    # the stage whose model answers ("1b"), or "<root>-base" when the root teacher is being built
    name: str
    model: str  # local directory or HF id
    key: str  # identity of its weights
    weight: float = 1.0
    system: str | None = None  # the kernel, in context, when building the root teacher
    revision: str | None = None


@dataclass
class GenJob:
    """A teacher's answers to one prompt set, cut into shards of shard_size prompts."""

    teacher: Teacher
    data: str
    step: Step
    shard_size: int

    def shards(self, n_prompts: int) -> int:
        return -(-n_prompts // self.shard_size)


@dataclass
class PhaseGraph:
    index: int
    name: str
    data: str  # key into cfg.data
    iters: int
    lr: float
    dataset: Step  # the curated dataset it trains on
    model: Step  # the fused model after this phase
    kind: str = "sft"  # cascade/phases/: what it trains on, its loss
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageGraph:
    name: str
    base_model: str
    base_key: str
    revision: str | None
    teachers: list[Teacher] = field(default_factory=list)
    gen_jobs: list[GenJob] = field(default_factory=list)
    phases: list[PhaseGraph] = field(default_factory=list)
    eval: Step | None = None
    gate: Step | None = None  # the promotion gate's verdict (stages/gate.py)
    release: Step | None = None  # release.enabled: the model card, HF directory and GGUF files

    @property
    def trains(self) -> bool:
        return bool(self.phases)

    @property
    def final_model(self) -> str:
        return self.phases[-1].model.path if self.phases else self.base_model

    @property
    def final_key(self) -> str:
        return self.phases[-1].model.key if self.phases else self.base_key


@dataclass
class Work:
    """One entry of the run's table: a step of kind `kind` (its module stages/<kind>.py declares
    `run`, what the driver calls, and `cost`, what the planner calls) for one stage, committing
    `steps` in order by the step protocol (cascade.steps.execute); its steps' keys determine it."""

    kind: str  # generate, curate, train, evaluate, gate, release
    stage: StageGraph
    steps: list[Step]
    teacher: Teacher | None = None  # generate: whose answers
    phase: PhaseGraph | None = None  # curate: which phase's dataset
    # runs beside the train work before it when that one runs (cascade/overlap.py); generate: its
    # replicas are kept up for the same teacher's work beside training (keep)
    beside: bool = False
    keep: bool = False

    def jobs(self, todo: list[Step]) -> list[GenJob]:
        """The stage's prompt sets to answer whose steps are among `todo` (generate)."""
        names = {s.name for s in todo}
        return [j for j in self.stage.gen_jobs if j.step.name in names]

    def phases(self, todo: list[Step]) -> list[PhaseGraph]:
        """The stage's phases to train whose steps are among `todo` (train)."""
        names = {s.name for s in todo}
        return [ph for ph in self.stage.phases if ph.model.name in names]


@dataclass
class RunGraph:
    """What a run needs before Ray starts: the config, the run directory, the inputs read and
    checked, the plan."""

    cfg: Config
    rd: RunDir
    prompts: dict[str, list[Prompt]]
    kernel: str
    stages: list[StageGraph]

    def work(self, overlap: frozenset[str] | set[str] = frozenset()) -> list[Work]:
        """The run's table, in run order: what the driver runs and the planner costs. Per trained
        stage: each teacher's answers (one pool of replicas for its prompt sets), each phase's
        dataset, the curriculum (one Ray Train job), evaluation, gate, release; shared answers once.
        Overlapped (cascade/overlap.py): the first set's, its phases, beside them the others'."""
        from cascade.overlap import split

        out, seen = [], set()

        def add(kind: str, sp: StageGraph, steps: list[Step], **kw: Any) -> None:
            steps = [s for s in steps if s.name not in seen]
            seen.update(s.name for s in steps)
            if steps:
                out.append(Work(kind, sp, steps, **kw))

        def answers(sp: StageGraph, data: set[str], lead: bool = False, beside: bool = False):
            gens = [(t, [j.step for j in sp.gen_jobs if j.teacher is t and j.data in data
                         and j.step.name not in seen]) for t in sp.teachers]
            gens = [g for g in gens if g[1]][:: -1 if beside else 1]  # the kept replicas' first
            for k, (t, steps) in enumerate(gens, 1):
                add("generate", sp, steps, teacher=t, beside=beside, keep=lead and k == len(gens))
            for ph in (ph for ph in sp.phases if ph.data in data):
                add("curate", sp, [ph.dataset], phase=ph, beside=beside)

        for sp in self.stages:
            if cut := split(sp) if sp.name in overlap else None:
                answers(sp, {sp.phases[0].data}, lead=True)
                add("train", sp, [ph.model for ph in sp.phases[: cut[0]]])
            answers(sp, set(cut[1]) if cut else {ph.data for ph in sp.phases}, beside=bool(cut))
            add("train", sp, [ph.model for ph in sp.phases])
            add("evaluate", sp, [sp.eval] if sp.trains else [])
            add("gate", sp, [sp.gate] if sp.gate else [])
            add("release", sp, [sp.release] if sp.release else [])
        return out

    def steps(self) -> list[Step]:
        """Every step of the plan in run order, each once."""
        return [s for w in self.work() for s in w.steps]

    def pending(self) -> list[str]:
        """Names of the steps not committed, in run order."""
        return [s.name for s in self.steps() if not self.rd.committed(s)]


@dataclass
class Context:
    """What every step's run is given: the plan, and the driver's handles and decisions. Steps read
    it; the run state (the manifest) stays the driver's."""

    graph: RunGraph
    # (generation, token): fences commits made inside a worker's job
    lease: tuple[int, str] | None = None
    # cascade.preemption.Preemption: SIGTERM deferred while training workers checkpoint
    stop: Any = None
    cpus: int = 1  # CPUs (torch threads) per training worker
    # evaluation has CPUs beside training's: the base student is scored while it trains
    spare: bool = False
    # stage -> that score in flight (stages/evaluate.py); teacher -> its replicas kept up (keep)
    before: dict[str, Any] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return self.graph.cfg

    @property
    def rd(self) -> RunDir:
        return self.graph.rd


def needed_stages(cfg: Config) -> list[str]:
    """The target and, transitively, every stage it learns from, lowest first."""
    need, todo = set(), [cfg.target]
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(t.stage for t in cfg.stages[s].teachers)
    return [s for s in cfg.stage_order() if s in need]


def shard_size_for(cfg: Config, n_prompts: int) -> int:
    """Prompts per shard. generation.shard_size when set; auto (0): large enough to fill one engine
    batch (the backend's batch capacity: hf's batch_size, vllm's max_num_seqs), otherwise N / (8 x
    replicas) so every replica gets about 8 shards and a crash redoes at most ~1/8 of its share;
    never above N."""
    g, b = cfg.generation, cfg.backend
    if g.shard_size:
        return g.shard_size
    batch = generation.load(b.name).batch_capacity(b.options)
    return max(1, min(n_prompts, max(batch, -(-n_prompts // (8 * g.replicas)))))


def sampling(cfg: Config) -> Sampling:
    """The sampling parameters every teacher generates with."""
    g = cfg.generation
    return Sampling(g.max_new_tokens, g.temperature, g.top_p, g.n_samples, g.logprobs)


def prompt_seed(cfg: Config, teacher: Teacher, data: str, prompt_id: str) -> int:
    """The seed of one prompt's answers: the same whichever replica, shard or run generates them."""
    return int(stable_hash("seed", cfg.seed, teacher.key, data, prompt_id)[:8], 16)


def backend_kwargs(cfg: Config, teacher: Teacher) -> dict[str, Any]:
    """What every backend's create() takes beside its own options, for one teacher's model."""
    return dict(dtype=cfg.backend.dtype, revision=teacher.revision,
                trust_remote_code=cfg.models.trust_remote_code, seed=cfg.seed)


def _teachers(cfg: Config, stage: str, sp: StageGraph, done: dict[str, StageGraph],
              kernel: str) -> list[Teacher]:
    spec = cfg.stages[stage]
    if spec.teachers:
        return [Teacher(t.stage, done[t.stage].final_model, done[t.stage].final_key, t.weight,
                        revision=None if done[t.stage].trains else done[t.stage].revision)
                for t in spec.teachers]
    if spec.build:  # context distillation: the base answers with the kernel in context
        return [Teacher(f"{stage}-base", sp.base_model, sp.base_key, 1.0, kernel, spec.revision)]
    return []


def _gen_jobs(cfg: Config, rd: RunDir, teachers: list[Teacher],
              prompts: dict[str, list[Prompt]]) -> list[GenJob]:
    g, b = cfg.generation, cfg.backend
    samp = {k: getattr(g, k)
            for k in ("max_new_tokens", "temperature", "top_p", "n_samples", "logprobs")}
    backend_id = (b.name, b.dtype, generation.load(b.name).sample_identity(b.options))
    jobs = []
    for t in teachers:
        for data in dict.fromkeys(p.data for p in cfg.curriculum):
            shard = shard_size_for(cfg, len(prompts[data]))
            data_id = (file_digest(cfg.data[data].path), dataclasses.asdict(cfg.data[data]))
            key = stable_hash("gen", t.key, t.system, samp, shard, backend_id, cfg.seed, data_id)
            # a teacher trained in this run
            made_by = tuple(m for m in (t.model,) if m.startswith(f"{rd.root}/"))
            jobs.append(GenJob(t, data,
                               Step(f"generate/{t.name}/{data}", key,
                                    rd.generation(t.name, data, key),
                                             made_by), shard))
    return jobs


def _phases(cfg: Config, rd: RunDir, stage: str, base_key: str, jobs: list[GenJob],
            kernel: str) -> list[PhaseGraph]:
    g = cfg.generation
    train_id = cfg.train.identity()
    phases, prev = [], base_key
    for i, ph in enumerate(cfg.curriculum):
        gens = [(j.teacher.name, j.teacher.weight, j.step.key) for j in jobs if j.data == ph.data]
        dkey = stable_hash("data", stage, ph.name, gens, cfg.seed,
                           (g.drop_truncated, g.min_chars, g.max_chars))
        # a kind that puts the kernel in a teacher's context is keyed by it too
        kind = phase_kinds.load(ph.kind)
        uses = getattr(kind, "uses_kernel", None)
        extra = ((stable_hash(kernel),) if uses
                 and uses(phase_kinds.options(ph.kind, ph.options, ph.name)) else ())
        tkey = stable_hash("train", prev, dkey, phase_identity(ph), train_id, cfg.train_seed,
                           *extra)
        data = Step(f"{stage}/dataset/{ph.name}", dkey, rd.dataset(stage, ph.name),
                    tuple(j.step.path for j in jobs if j.data == ph.data))
        model = Step(f"{stage}/train/{ph.name}", tkey, rd.model(stage, i, ph.name),
                     (data.path,) + ((phases[-1].model.path,) if phases else ()))
        phases.append(PhaseGraph(i, ph.name, ph.data, ph.iters, ph.lr, data, model, ph.kind,
                                 dict(ph.options)))
        prev = tkey
    return phases


def plan(cfg: Config, rd: RunDir, prompts: dict[str, list[Prompt]], kernel: str,
         weights: bool = True) -> list[StageGraph]:
    """Every stage up to cfg.target with its steps and their keys, lowest stage first.
    weights=False: the hub models need not be in the local cache (status and the planner, on a
    machine that only reads the run)."""
    done: dict[str, StageGraph] = {}
    for stage in needed_stages(cfg):
        base_model, base_key = model_identity(cfg, stage, weights)
        sp = StageGraph(stage, base_model, base_key, cfg.stages[stage].revision)
        sp.teachers = _teachers(cfg, stage, sp, done, kernel)
        if sp.teachers:
            sp.gen_jobs = _gen_jobs(cfg, rd, sp.teachers, prompts)
            sp.phases = _phases(cfg, rd, stage, base_key, sp.gen_jobs, kernel)
            harness = ([[list(cfg.release.harness), cfg.release.harness_limit]]
                       if cfg.gate.max_harness_drop is not None else [])
            ekey = stable_hash("eval", base_key, sp.final_key, [p.dataset.key for p in sp.phases],
                               cfg.eval.identity(), *harness)
            sp.eval = Step(f"{stage}/eval", ekey, rd.eval(stage),
                           (sp.final_model, *dict.fromkeys(p.dataset.path for p in sp.phases)))
            # the teachers' verdicts are part of the ledger (not of any other step's key)
            gkey = stable_hash("gate", ekey, cfg.gate, [done[t.name].gate.key for t in sp.teachers
                                                        if t.name in done and done[t.name].gate])
            sp.gate = Step(f"{stage}/gate", gkey, rd.gate(stage), (sp.eval.path,))
            if cfg.release.enabled:
                rkey = stable_hash("release", sp.final_key, ekey, gkey, cfg.release,
                                   cfg.train.max_seq_len)
                sp.release = Step(f"{stage}/release", rkey, rd.release(stage),
                                  (sp.final_model, sp.eval.path, sp.gate.path))
        done[stage] = sp
    return list(done.values())


def build_graph(cfg: Config, weights: bool = True) -> RunGraph:
    """Read and check every input (before Ray starts or a model loads), open the run directory,
    plan."""
    used = list(dict.fromkeys(p.data for p in cfg.curriculum))
    prompts = {k: load_prompts(cfg.data[k]) for k in used}
    for k, ps in prompts.items():
        if all(p.heldout for p in ps):
            raise ConfigError(f"data.{k} ({cfg.data[k].path}): all {len(ps)} prompts are held out, "
                              "none left to train "
                              f"on (lower heldout_fraction, or mark fewer rows heldout)")
    kernel = read_text(cfg.kernel)
    rd = RunDir(cfg.run_dir, cfg.verify)
    graph = RunGraph(cfg, rd, prompts, kernel, plan(cfg, rd, prompts, kernel, weights))
    if weights:  # the tokenizers are on this machine
        phase_kinds.check_tokenizers(graph)
    return graph
