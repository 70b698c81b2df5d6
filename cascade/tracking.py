"""The run in MLflow (tracking.mlflow=true) and W&B (tracking.wandb=true, offline): what users of
TRL, verl and axolotl look at, from the run's committed records only, written by the driver after
every stage and on every invocation.

    python -m cascade +stage=4b models=tiny tracking.mlflow=true   # into <run_dir>/mlflow/
    mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow/mlflow.db    # http://127.0.0.1:5000

One MLflow experiment per run directory (tracking.experiment, default "cascade"); per stage a run
(its config, `cascade.stage`), each committed step of the stage a nested run: a training phase's
loss at every optimizer step, throughput and options; generation's and curation's counts; the
evaluation's figures with metrics.json; the gate's verdict (a tag), criteria and verdict.json; the
release's formats with the model card. Any tracking URI by setting (tracking.uri, e.g. a server: its
credentials from MLflow's own environment variables, never the config).

Exactly once: a step's run is found by its tags (run directory, step name, step key); one that was
not finished (`cascade.logged` unset: the driver died while logging it) is deleted and logged again,
so a re-run, a resume or a second invocation adds no run and no point. TensorBoard's logs stay
(<stage>/train/_work/tensorboard). W&B: the same figures per step, offline (`_sync_wandb`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cascade.graph import RunGraph, StageGraph
from cascade.rundir import Step, stable_hash

log = logging.getLogger(__name__)


def uri(p: RunGraph) -> str:
    """tracking.uri, or MLflow's own default kind of store, SQLite, in the run directory:
    <run_dir>/mlflow/mlflow.db, artifacts beside it (MLflow 3 refuses new file stores; on an object
    store's run directory this node's mirror of it: give a tracking server there)."""
    if p.cfg.tracking.uri:
        return p.cfg.tracking.uri
    return f"sqlite:///{_store(p)}/mlflow.db"


def _store(p: RunGraph) -> Path:
    d = p.rd.local("mlflow").resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d


def sync(p: RunGraph) -> None:
    """Every committed step of the plan's trained stages logged once to each tracker chosen; a
    failure is logged and never stops the run."""
    for name, on, log_to in (("MLflow", p.cfg.tracking.mlflow, _sync),
                             ("W&B", p.cfg.tracking.wandb, _sync_wandb)):
        if not on:
            continue
        try:
            log_to(p)
        except Exception as e:  # the run's own records stay the truth; tracking is a view of them
            log.warning("%s tracking failed (the run goes on): %s: %s", name, type(e).__name__,
                        str(e)[:300])


def _sync(p: RunGraph) -> None:
    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=uri(p))
    name = p.cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    where = None if p.cfg.tracking.uri else (_store(p) / "artifacts").as_uri()
    exp_id = exp.experiment_id if exp else client.create_experiment(name, where)
    tags = {"cascade.run_dir": p.rd.url, "cascade.run": stable_hash(p.rd.url)}
    new = 0
    for sp in p.stages:
        steps = [(kind, s, rec) for kind, s in _steps(sp) if (rec := p.rd.committed(s))]
        if not steps:
            continue
        parent = _run(client, exp_id, {**tags, "cascade.stage": sp.name}, sp.name,
                      lambda rid: _log_stage(client, rid, p, sp))
        for kind, s, rec in steps:
            new += _run(client, exp_id, {**tags, "cascade.step": s.name, "cascade.key": s.key},
                        s.name, lambda rid, a=(kind, s, rec): _log_step(client, rid, p, *a),
                        parent)[1]
    if new:
        log.info("MLflow: %d step runs logged to %s (experiment %s, mlflow %s)", new, uri(p), name,
                 mlflow.__version__)


def _steps(sp: StageGraph) -> list[tuple[str, Step]]:
    """(kind, step) of a trained stage's steps, in run order (a teacher's answers shared by stages:
    under the first)."""
    return ([("generate", j.step) for j in sp.gen_jobs if sp.phases]
            + [("curate", ph.dataset) for ph in sp.phases]
            + [("train", ph.model) for ph in sp.phases]
            + [(k, s) for k, s in (("evaluate", sp.eval), ("gate", sp.gate),
                                   ("release", sp.release)) if s])


def _run(client: Any, exp_id: str, tags: dict, name: str, fill: Any,
         parent: tuple[str, int] | None = None) -> tuple[str, int]:
    """(the id of the run with these tags, 1 if it was logged now): found when logged whole; else
    (a half-logged one deleted) created, filled by `fill(run_id)`, then marked logged."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([exp_id], filter_string=query, max_results=10)
    done = [r for r in found if r.data.tags.get("cascade.logged") == "1"]
    if done:
        return done[0].info.run_id, 0
    for r in found:
        client.delete_run(r.info.run_id)
    extra = {"mlflow.parentRunId": parent[0]} if parent else {}
    rid = client.create_run(exp_id, run_name=name, tags={**tags, **extra}).info.run_id
    fill(rid)
    client.set_tag(rid, "cascade.logged", "1")
    client.set_terminated(rid)
    return rid, 1


def _log_stage(client: Any, rid: str, p: RunGraph, sp: StageGraph) -> None:
    client.log_batch(rid, params=_params(_stage_params(p, sp)))
    cfg = p.rd.read_bytes(p.rd.path("config.yaml"))  # the resolved config: no secret in it
    if cfg:
        _artifact(client, rid, "config.yaml", cfg)


def _stage_params(p: RunGraph, sp: StageGraph) -> dict:
    return {"stage": sp.name, "model": p.cfg.stages[sp.name].model, "base_key": sp.base_key,
            "seed": p.cfg.seed, "teachers": ",".join(f"{t.name}:{t.weight:g}" for t in sp.teachers),
            "curriculum": ",".join(f"{ph.name}:{ph.kind}:{ph.iters}:{ph.lr:g}"
                                   for ph in sp.phases)}


def _log_step(client: Any, rid: str, p: RunGraph, kind: str, s: Step, rec: dict) -> None:
    """A committed step's figures (at its commit time), parameters and files."""
    f = _figures(p, kind, s, rec)
    for key, values in f["series"].items():
        _series(client, rid, rec, key, values)
    for k, v in f["tags"].items():
        client.set_tag(rid, k, v)
    client.log_batch(rid, metrics=_metrics(rec, f["metrics"]), params=_params(f["params"]))
    for name, path in f["files"].items():
        _artifact(client, rid, name, p.rd.read_bytes(path))


def _figures(p: RunGraph, kind: str, s: Step, rec: dict) -> dict[str, dict]:
    """What a tracker shows of a committed step: per-step series (a training phase's losses),
    metrics, parameters, tags and files (name: path in the run directory)."""
    rd, summary = p.rd, rec["summary"]
    out: dict[str, dict] = {"series": {}, "metrics": {}, "params": {}, "tags": {}, "files": {}}
    if kind == "train":
        out["series"] = {"loss": summary["losses"], **{
            k[: -len("es")]: summary[k] for k in summary if k.endswith("_losses")}}
        out["metrics"] = {k: summary.get(k) for k in ("tokens_per_s", "train_seconds", "tokens")}
        out["params"] = {"iters": summary.get("steps"),
                         "options": json.dumps(summary.get("options", {}))}
    elif kind == "generate":
        out["metrics"] = {k: summary.get(k)
                          for k in ("records", "completion_tokens", "compute_seconds")}
    elif kind == "curate":
        out["metrics"] = {f"records_{k}": v for k, v in summary["counts"].items()}
    elif kind == "evaluate":
        out["metrics"] = _flat(rd.read_json(f"{s.path}/metrics.json") or {})
        out["files"]["metrics.json"] = f"{s.path}/metrics.json"
    elif kind == "gate":
        v = rd.read_json(f"{s.path}/verdict.json")
        out["tags"]["cascade.verdict"] = v["verdict"]
        out["metrics"] = {f"gate_{c['name']}": c["value"] for c in v["criteria"]}
        out["params"] = {f"gate.{k}": x for k, x in v["thresholds"].items()}
        out["files"]["verdict.json"] = f"{s.path}/verdict.json"
    else:  # the release
        out["metrics"] = {f"agreement_{f['format'].split()[-1]}": f.get("agreement")
                          for f in summary.get("formats", [])}
        out["files"]["README.md"] = f"{s.path}/README.md"
    return out


def _sync_wandb(p: RunGraph) -> None:
    """W&B, offline: a run per committed step under <run_dir>/wandb/wandb/offline-run-*-<id> (its
    id from the run directory, the step and its key; grouped by stage, its job type the step's
    kind; `wandb sync <that directory>` uploads it, with WANDB_API_KEY from the environment). No
    system metrics, console or code captured. Exactly once: a marker (<run_dir>/wandb/logged/<id>)
    is written after the run finished; a run without one (the driver died while logging it) is
    deleted and logged again."""
    import wandb

    root = p.rd.local("wandb").resolve()
    (root / "logged").mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(mode="offline", console="off", save_code=False, silent=True,
                              x_disable_stats=True, x_disable_meta=True)
    new = 0
    for sp in p.stages:
        for kind, s, rec in [(k, s, r) for k, s in _steps(sp) if (r := p.rd.committed(s))]:
            rid = stable_hash(p.rd.url, s.name, s.key)
            if (root / "logged" / rid).exists():
                continue
            for half in (root / "wandb").glob(f"offline-run-*-{rid}"):
                shutil.rmtree(half)
            f = _figures(p, kind, s, rec)
            run = wandb.init(dir=root, id=rid, project=p.cfg.tracking.experiment, group=sp.name,
                             job_type=kind, name=s.name, settings=settings, config={
                                 **_stage_params(p, sp), **f["params"], "step_key": s.key,
                                 "run_dir": p.rd.url})
            for i in range(max(map(len, f["series"].values()), default=0)):
                run.log({k: float(v[i]) for k, v in f["series"].items() if i < len(v)}, step=i)
            run.summary.update({**{k: v for k, v in f["metrics"].items() if v is not None},
                                **f["tags"]})
            for name, path in f["files"].items():
                Path(run.dir, name).write_bytes(p.rd.read_bytes(path))
                run.save(str(Path(run.dir, name)), base_path=run.dir, policy="now")
            run.finish()
            (root / "logged" / rid).write_text(s.name + "\n")
            new += 1
    if new:
        log.info("W&B (offline): %d step runs logged under %s (wandb %s)", new, root / "wandb",
                 wandb.__version__)


def _flat(m: dict) -> dict:
    """The evaluation's numbers: agreement, text agreement, self-ended, conditioning, reverse KL,
    before/after."""
    out = {}
    for k in ("agreement", "text_agreement", "self_ended", "conditioning"):
        for when in ("before", "after", "delta"):
            out[f"{k}_{when}"] = (m.get(k) or {}).get(when)
    for how, kl in (m.get("reverse_kl") or {}).items():
        if isinstance(kl, dict):
            out.update({f"reverse_kl_{how}_{w}": kl.get(w) for w in ("before", "after", "cut")})
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def _series(client: Any, rid: str, rec: dict, key: str, values: list[float]) -> None:
    """One value per optimizer step (MLflow's step), stamped with the step's commit time."""
    from mlflow.entities import Metric

    when = int(rec.get("time", 0) * 1000)
    for i in range(0, len(values), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(rid, metrics=[Metric(key, float(v), when, i + j)
                                       for j, v in enumerate(values[i : i + 1000])])


def _metrics(rec: dict, values: dict) -> list:
    from mlflow.entities import Metric

    when = int(rec.get("time", 0) * 1000)
    return [Metric(k, float(v), when, 0) for k, v in sorted(values.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _params(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(values.items()) if v is not None]


def _artifact(client: Any, rid: str, name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, name).write_bytes(data)
        client.log_artifact(rid, str(Path(d, name)))
