"""The run report: <run_dir>/report/index.html with PNG plots (matplotlib), static, opened from disk
(no server).

    python -m cascade report +stage=4b  # rebuilds it; the driver rebuilds it after every stage

Made from the run's committed records only (step records, the evaluation's metrics), for every stage
of the plan that has them:
- loss.png: training loss per optimizer step, a panel per stage, the phases end to end;
- signal.png: the ledger - student-teacher agreement before and after each stage's curriculum, and
  each gate criterion's value against its threshold, stages side by side with their verdicts (the
  seed's claim: the alignment signal carries upward through the cascade);
- funnel.png: the curation funnel per stage, phase and teacher: generated, failed, empty, truncated,
  too long, duplicate, kept;
- throughput.png: generation tokens/s per teacher and prompt set, training tokens/s per stage and
  phase. A failure to build it is logged and never stops a run.
"""

from __future__ import annotations

import html
import io
import logging
from typing import Any

from cascade import loads
from cascade.config import Config
from cascade.graph import RunGraph, build_graph
from cascade.status import said

log = logging.getLogger(__name__)
FUNNEL = ("generated", "failed", "empty", "truncated", "too_long", "duplicate", "kept")
PLOTS = ("signal", "loss", "funnel", "throughput")


def gather(p: RunGraph) -> dict:
    """What the report shows, from committed records: {stages: {name: {phases, agreement, funnel}},
    generation}."""
    rd, out = p.rd, {"stages": {}, "generation": {}}
    weights = loads.per_stage(p)
    for sp in p.stages:
        for job in sp.gen_jobs:
            rec = rd.committed(job.step)
            if rec and rec["summary"].get("compute_seconds"):
                s = rec["summary"]
                out["generation"][job.step.name] = {
                    "tokens": s["completion_tokens"],
                    "records": s["records"],
                    "tokens_per_s": s["completion_tokens"] / s["compute_seconds"],
                }
        st = {"phases": {}, "agreement": None, "reverse_kl": None, "funnel": {}, "gate": None,
              "loads": loads.per_model(weights.get(sp.name, []))}
        for ph in sp.phases:
            if rec := rd.committed(ph.model):
                s = rec["summary"]
                st["phases"][ph.name] = {"losses": s["losses"], "tokens_per_s": s["tokens_per_s"],
                                         "steps": s["steps"]}
            if rec := rd.committed(ph.dataset):
                s = rec["summary"]
                groups = s.get("by_teacher") or {"all": s["counts"]}
                st["funnel"][ph.name] = {t: _funnel(c) for t, c in groups.items()}
        if sp.eval and rd.committed(sp.eval):
            m = rd.read_json(rd.metrics(sp.name)) or {}
            st["agreement"], st["reverse_kl"] = (m.get("agreement"),
                                                 (m.get("reverse_kl") or {}).get("sampled"))
        if sp.gate and rd.committed(sp.gate):
            st["gate"] = rd.read_json(f"{rd.gate(sp.name)}/verdict.json")  # stages/gate.py
        if st["phases"] or st["funnel"] or st["agreement"]:
            out["stages"][sp.name] = st
    return out


def _funnel(c: dict) -> dict:
    f = {k: c.get(k, 0) for k in FUNNEL}
    f["duplicate"] = c.get("duplicate_exact", 0) + c.get("duplicate_normalized", 0)
    return f


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_loss(data: dict) -> bytes:
    import matplotlib.pyplot as plt

    stages = [s for s, st in data["stages"].items() if st["phases"]]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5),
                             squeeze=False)
    for ax, s in zip(axes[0], stages):
        at = 0
        for name, ph in data["stages"][s]["phases"].items():
            ax.plot(range(at + 1, at + len(ph["losses"]) + 1), ph["losses"], label=name)
            at += len(ph["losses"])
        ax.set(title=f"stage {s}", xlabel="optimizer step", ylabel="training loss (nats/token)")
        ax.legend(fontsize=8)
    return _png(fig)


def plot_signal(data: dict) -> bytes:
    """The ledger: per stage, its agreement with its teachers before and after its curriculum, then
    each of its gate's criteria (stages/gate.py) side by side, its threshold dashed, a bar green
    when it passed, red when it failed; each stage named with its verdict."""
    import matplotlib.pyplot as plt

    stages = [s for s, st in data["stages"].items() if st["agreement"]]
    gates = {s: data["stages"][s].get("gate") or {} for s in stages}
    names = list(dict.fromkeys(c["name"] for g in gates.values() for c in g.get("criteria", [])))
    fig, axes = plt.subplots(1, 1 + len(names),
                             figsize=((1 + len(names)) * max(3.2, 1.2 * len(stages) + 1.5), 3.5),
                             squeeze=False)
    ticks = [f"{s}\n{gates[s].get('verdict', '')}" for s in stages]
    ax = axes[0][0]
    for i, s in enumerate(stages):
        a = data["stages"][s]["agreement"]
        ax.bar([i - 0.2, i + 0.2], [a["before"], a["after"]], width=0.4,
               color=["#bbbbbb", "#3b7dd8"], label=["before", "after"] if i == 0 else None)
    ax.set(ylabel="agreement with teachers\n(log-likelihood, nats/token)",
           title="signal through the cascade")
    ax.set_xticks(range(len(stages)), ticks)
    if stages:
        ax.legend(fontsize=8)
    for ax, name in zip(axes[0][1:], names):
        for i, s in enumerate(stages):
            c = next((c for c in gates[s].get("criteria", []) if c["name"] == name), None)
            if c and c["value"] is not None:
                ax.bar(i, c["value"], width=0.5,
                       color="#3a9b4b" if c["passed"] else "#d0443c")
                ax.hlines(c["threshold"], i - 0.4, i + 0.4, colors="k", linestyles="dashed")
        ax.set_xticks(range(len(stages)), ticks)
        ax.set(title=f"gate: {name}", ylabel="value (dashed: threshold)")
    return _png(fig)


def plot_funnel(data: dict) -> bytes:
    import matplotlib.pyplot as plt

    groups = [(f"{s}/{ph}\n{t}", f) for s, st in data["stages"].items() for ph,
              ts in st["funnel"].items()
              for t, f in ts.items()]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) + 2), 3.8))
    width = 0.8 / len(FUNNEL)
    for k, name in enumerate(FUNNEL):
        ax.bar([i + k * width for i in range(len(groups))], [f[name] for _, f in groups],
               width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [g for g, _ in groups],
                  fontsize=7)
    ax.set(ylabel="answers", title="curation funnel per teacher")
    ax.legend(fontsize=7, ncol=4)
    return _png(fig)


def plot_throughput(data: dict) -> bytes:
    import matplotlib.pyplot as plt

    gen = [(k.removeprefix("generate/"), v["tokens_per_s"]) for k, v in data["generation"].items()]
    train = [(f"{s}/{ph}", v["tokens_per_s"]) for s, st in data["stages"].items() for ph,
             v in st["phases"].items()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, rows, title in ((axes[0], gen, "generation (engine tokens/s)"),
                            (axes[1], train, "training (tokens/s)")):
        ax.barh([r[0] for r in rows], [r[1] for r in rows], color="#3b7dd8")
        ax.set(title=title, xlabel="tokens/s")
    return _png(fig)


def _html(cfg: Config, data: dict) -> str:
    rows = []
    for s, st in data["stages"].items():
        a = st["agreement"]
        signal = (f"{a['before']:.3f} &rarr; {a['after']:.3f} ({a['after'] - a['before']:+.3f})"
                  if a else "-")
        phases = ", ".join(f"{html.escape(n)}: {p['steps']} steps, loss {p['losses'][0]:.3f} "
                           f"&rarr; {p['losses'][-1]:.3f}" for n, p in st["phases"].items()) or "-"
        k = st.get("reverse_kl")
        kl = f"{k['before']:.3f} &rarr; {k['after']:.3f}" if k else "-"
        g = st.get("gate")
        gate = html.escape(said(g)) if g else "-"
        lw = html.escape(loads.describe(st["loads"])) if st.get("loads") else "-"
        rows.append(f"<tr><td>{html.escape(s)}</td><td>{signal}</td><td>{kl}</td><td>{gate}</td>"
                    f"<td>{phases}</td><td>{lw}</td></tr>")
    imgs = "\n".join(f'<h2>{n}</h2><img src="{n}.png" alt="{n}">' for n in PLOTS)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cascade report: {html.escape(cfg.target)}</title>
<style>body{{font-family:sans-serif;margin:2em}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
img{{max-width:100%}}</style></head><body>
<h1>cascade run report (target {html.escape(cfg.target)})</h1>
<p>run directory: <code>{html.escape(cfg.run_dir)}</code></p>
<table><tr><th>stage</th><th>agreement with teachers, before &rarr; after (nats/token)</th>
<th>reverse KL to teachers on its own sampled answers, before &rarr; after (nats/token)</th>
<th>gate (stages/gate.py)</th><th>phases</th><th>weight loads (cascade/loads.py)</th></tr>
{''.join(rows)}</table>
{imgs}
</body></html>
"""


def build(p: RunGraph) -> str:
    """Write <run_dir>/report/ (plots first, the page last); returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    rd, data = p.rd, gather(p)
    plots = {"loss": plot_loss, "signal": plot_signal, "funnel": plot_funnel,
             "throughput": plot_throughput}
    for name in PLOTS:
        # not a failpoint: best effort
        rd.write_bytes(rd.report(f"{name}.png"), plots[name](data), point="")
    rd.write_bytes(rd.report("index.html"), _html(p.cfg, data).encode(), point="")
    return rd.report("index.html")


def refresh(p: RunGraph) -> None:
    """The driver's call after every stage: a report that cannot be made is logged, never fatal."""
    try:
        log.info("report: %s", build(p))
    except Exception as e:  # noqa: BLE001 - a plot must never cost a run
        log.warning("report not written: %s: %s", type(e).__name__, e)


def main(cfg: Config, *flags: str) -> None:
    print(build(build_graph(cfg)))
