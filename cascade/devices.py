"""What the planner (cascade/plan.py) plans for: the devices - given (plan.gpu, plan.gpus), found on
this machine or on the cluster at cluster.address, or this CPU - and the rates a run measured on
them (its committed steps' summaries), which replace the planner's estimates on the same kind of
device only.
"""

from __future__ import annotations

from dataclasses import dataclass

from cascade.config import DEVICES, Config
from cascade.rundir import RunDir

GB = 1e9


# -- the devices -----------------------------------------------------------------------------------
@dataclass
class Device:
    kind: str
    count: int
    memory_gb: float
    bandwidth_gbs: float
    tflops: float
    source: str

    @property
    def cpu(self) -> bool:
        return self.kind == "cpu"


def device(cfg: Config) -> Device:
    """What the run's steps run on: the GPUs given, found on the attached cluster or this machine,
    else 8 of plan.gpu; this machine's CPU and memory when neither training nor generation asks for
    a GPU."""
    p = cfg.plan
    if not (cfg.train.use_gpu or cfg.backend.num_gpus > 0):
        import psutil

        _, bw, tf = DEVICES["cpu"]
        return Device("cpu", 1, psutil.virtual_memory().total / GB, bw, tf,
                      "this machine (no step asks for a GPU)")
    mem, bw, tf = DEVICES[p.gpu]
    count, found_mem, source = p.gpus, p.gpu_memory_gb, "given (plan.gpus, plan.gpu_memory_gb)"
    if count is None or found_mem is None:
        n, m, where = _cluster_gpus(cfg) if cfg.cluster.address else _local_gpus()
        count, found_mem = count or n, found_mem or m
        source = (f"found on {where}" if n
                  else f"assumed: {p.gpu} (none found on {where}; give plan.gpus)")
    return Device(p.gpu, count or 8, found_mem or mem, bw, tf, source)


def _local_gpus() -> tuple[int, float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return 0, None, "this machine"
    return (torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GB,
            "this machine")


def _cluster_gpus(cfg: Config) -> tuple[int, float | None, str]:
    """The attached cluster's GPU count (joined as a client only: nothing is started on it)."""
    from cascade import cluster

    if cfg.cluster.auth:
        cluster.ensure_auth_token()
    import ray

    ray.init(address=cfg.cluster.address, namespace="cascade-plan", log_to_driver=False,
             configure_logging=False)
    try:
        return (int(ray.cluster_resources().get("GPU", 0)), None,
                f"the cluster at {cfg.cluster.address}")
    finally:
        ray.shutdown()


# -- measured rates --------------------------------------------------------------------------------
@dataclass
class Measured:
    """Rates a run measured, from its manifest's committed steps: tokens/s per replica and generated
    tokens per sample by teacher, token slots/s and fixed seconds per phase by stage, engine start
    by teacher."""

    gen_rate: dict[str, float]
    gen_fill: dict[str, float]  # mean completion tokens / max_new_tokens
    gen_start: dict[str, float]
    train_rate: dict[str, float]
    train_fixed: dict[str, float]
    # the identity of the model each rate was measured with, by teacher / stage
    model_key: dict[str, str]

    @classmethod
    def read(cls, rd: RunDir, max_new_tokens: int, dev: Device) -> Measured:
        """Only steps that ran on the kind of device planned for count (a rate on a CPU says nothing
        of an H100); steps recorded before runs said where they ran count for nothing."""
        steps = (rd.read_json(rd.path("manifest.json")) or {}).get("steps", {})
        acc: dict[str, list[float]] = {}
        m = cls({}, {}, {}, {}, {}, {})
        for name, s in steps.items():
            sm, parts = s.get("summary") or {}, name.split("/")
            if s.get("state") != "done" or not same_device(sm.get("device"), dev):
                continue
            if parts[0] == "generate" and sm.get("compute_seconds"):
                a = acc.setdefault(f"g/{parts[1]}", [0.0, 0.0, 0.0])
                a[0], a[1], a[2] = (a[0] + sm["completion_tokens"], a[1] + sm["compute_seconds"],
                                    a[2] + sm["records"])
                m.gen_start[parts[1]] = sm.get("engine_start_s", 0.0)
                m.model_key[f"g/{parts[1]}"] = sm.get("model_key", "")
            elif len(parts) == 3 and parts[1] == "train" and sm.get("train_seconds"):
                a = acc.setdefault(f"t/{parts[0]}", [0.0, 0.0, 0.0])
                slots = sm["tokens"] / max(1e-9, sm.get("real_token_fraction") or 1.0)
                a[0], a[1], a[2] = (a[0] + slots, a[1] + sm["train_seconds"],
                                    a[2] + sm["seconds"] - sm["train_seconds"])
                m.model_key[f"t/{parts[0]}"] = sm.get("model_key", "")
        for k, (tok, sec, extra) in acc.items():
            kind, who = k.split("/", 1)
            if kind == "g":
                m.gen_rate[who], m.gen_fill[who] = tok / sec, tok / max(1.0, extra) / max_new_tokens
            else:
                m.train_rate[who] = tok / sec
                m.train_fixed[who] = extra / sum(1 for n in steps if n.startswith(f"{who}/train/"))
        return m


def same_device(recorded: str | None, dev: Device) -> bool:
    """Whether a step recorded as run on `recorded` (cascade.cluster.device_name) ran on the kind of
    device `dev` plans for: the CPU, or a GPU whose name carries the kind's model (H100-80GB:
    "NVIDIA H100 80GB HBM3")."""
    if not recorded:
        return False
    if dev.cpu or recorded == "cpu":
        return dev.cpu and recorded == "cpu"
    return dev.kind.split("-")[0].lower() in recorded.lower()
