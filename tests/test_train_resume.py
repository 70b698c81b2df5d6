"""Training resumes mid-phase: after SIGTERM, a Ray Train worker killed, kill -9 of the driver with
its newest checkpoint damaged, on more workers, under FSDP."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import KILL_ARGS as ARGS
from conftest import kill9, kill_train_workers, resumable, run_cli, start_cli, wait_for

# one reference
pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.xdist_group("train_resume")]
P1 = "4b/train/01-p1_composure"


def _ckpts(run: Path) -> list[Path]:
    return sorted(run.glob("4b/train/_ckpt/01-*/step-*/meta.json"))


def _summary(run: Path, rel: str = P1) -> dict:
    return json.loads((run / rel / "step.json").read_text())["summary"]


@pytest.fixture
def reference(kill_reference) -> Path:
    return kill_reference


def _same_student(a: Path, b: Path) -> None:
    for rel in (P1, "4b/train/02-p2_ethics"):
        assert (a / rel / "model.safetensors").read_bytes() == (
            b / rel / "model.safetensors"
        ).read_bytes(), rel
    assert _summary(a)["losses"] == _summary(b)["losses"]


def test_resume_on_two_workers_after_one(reference, tiny_4b_run, tmp_path):
    """Killed mid-P1 on one worker, resumed on two: the same global batch, split over two DDP ranks.
    Not the same bytes as the one-worker reference (each rank draws its own LoRA dropout, and each
    logs the loss of its half of the batch), so the result is checked against it within stated
    tolerances, set from a measured run (2026-12-02, at the preset's batch of 8: last-ten mean loss
    0.4 % apart; fused weights 3 % of training's movement apart; it passed at FAST's batch of 4 too,
    not re-measured): the losses before the kill equal the reference's exactly; the mean of the last
    ten within 3 %; the fused weights of P1 and P2 no further from the reference's than 10 % of how
    far training moved them from P0, and moved as far as the reference's within 5 %."""
    import statistics

    from safetensors.torch import load_file

    run = resumable(tiny_4b_run, tmp_path / "run")
    proc = start_cli(*ARGS, f"run_dir={run}", log=tmp_path / "a.log")
    wait_for(lambda: len(_ckpts(run)) >= 1, 600, proc, "a P1 checkpoint")
    kill9(proc)
    r = run_cli(*ARGS, f"run_dir={run}", "train.num_workers=2")
    assert r.returncode == 0, r.stdout[-4000:]
    s, ref = _summary(run), _summary(reference)
    at = s["resumed_from_step"]
    assert s["workers"] == 2 and at > 0 and len(s["losses"]) == 40
    assert s["losses"][:at] == ref["losses"][:at]
    assert statistics.mean(s["losses"][-10:]) == pytest.approx(
        statistics.mean(ref["losses"][-10:]), rel=0.03
    )

    def norm(a: dict, b: dict) -> float:
        return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in b) ** 0.5

    p0 = load_file(str(reference / "4b/train/00-p0_ethics/model.safetensors"))
    for rel in (P1, "4b/train/02-p2_ethics"):
        got, want = (load_file(str(d / rel / "model.safetensors")) for d in (run, reference))
        apart, moved = norm(got, want), norm(want, p0)
        assert apart <= 0.1 * moved and norm(got, p0) == pytest.approx(moved, rel=0.05), (
            rel,
            apart,
            moved,
        )


def test_fsdp_on_two_workers_resumes_mid_phase_to_the_same_adapter(tiny_4b_run, tmp_path):
    """train.strategy=fsdp (FSDP2 over gloo here, NCCL on GPUs: scripts/gpu_training.py): the
    adapter and optimizer state are gathered whole into the checkpoint and re-sharded on resume; the
    fused result is the same, bitwise, as an uninterrupted FSDP run's."""
    fsdp = [*ARGS, "train.strategy=fsdp", "train.num_workers=2"]
    # the generations and datasets reused; FSDP trains P0 again
    ref = resumable(tiny_4b_run, tmp_path / "ref")
    r = run_cli(*fsdp, f"run_dir={ref}")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "world_size=2" in r.stdout
    run = resumable(tiny_4b_run, tmp_path / "run")
    proc = start_cli(*fsdp, f"run_dir={run}", log=tmp_path / "a.log")
    wait_for(lambda: len(_ckpts(run)) >= 1, 600, proc, "a P1 checkpoint")
    kill9(proc)
    assert not (run / P1 / "step.json").exists(), "the kill must land mid-phase"
    r = run_cli(*fsdp, f"run_dir={run}")
    assert r.returncode == 0, r.stdout[-4000:]
    assert _summary(run)["resumed_from_step"] > 0 and _summary(run)["workers"] == 2
    _same_student(run, ref)


def _resumed(run: Path) -> dict | None:
    """The first optimizer step taken after the latest resume of P1, and when (rank 0 writes it)."""
    f = next(run.glob("4b/train/_ckpt/01-*/resumed.json"), None)
    return json.loads(f.read_text()) if f else None


def test_sigterm_a_killed_worker_and_a_damaged_checkpoint_in_one_phase_end_bitwise(
    reference, tiny_4b_run, tmp_path
):
    """Three faults in one phase (one run directory, so that CI runs the phase once), each resumed
    from the right step, and the adapter in the end the uninterrupted reference's, bitwise:
    1. SIGTERM while P1 trains: the workers checkpoint at the next optimizer step (no periodic
       checkpoint in this run), the driver exits 143 saying it was pre-empted, and the same command
       resumes from exactly that step;
    2. a Ray Train worker killed (this run's, found under its driver): Ray Train restarts the group,
       which resumes from the last checkpoint;
    3. kill -9 of the driver after two more checkpoints, the newest then truncated: the re-run says
       it is damaged and resumes from the one before."""
    run = resumable(tiny_4b_run, tmp_path / "run")

    def step(meta: Path) -> int:
        return json.loads(meta.read_text())["step"]

    # 1. SIGTERM
    proc = start_cli(*ARGS, "train.save_every=1000", f"run_dir={run}", log=tmp_path / "a.log")
    wait_for(lambda: (run / "progress/4b/train/p1_composure.json").exists(), 600, proc,
             "P1 under way")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "a.log").read_text()[-4000:]
    assert "pre-empted (SIGTERM)" in (tmp_path / "a.log").read_text()
    saved = _ckpts(run)
    assert saved and not (run / P1 / "step.json").exists(), "the signal must land mid-phase"
    at = step(saved[-1])
    assert json.loads((saved[-1]).read_text())["reason"] == "sigterm"

    # 2. the same command; once it has resumed and saved a checkpoint after that, its training
    #    worker killed
    proc = start_cli(*ARGS, f"run_dir={run}", log=tmp_path / "b.log")
    wait_for(lambda: _resumed(run) is not None, 600, proc, "the resume")
    assert _resumed(run)["step"] == at + 1, (_resumed(run), at)  # not a step more is redone
    wait_for(lambda: step(_ckpts(run)[-1]) > at, 600, proc, "a checkpoint after the resume")
    struck = step(_ckpts(run)[-1])
    t_kill = kill_train_workers(proc)
    wait_for(lambda: _resumed(run)["time"] > t_kill, 600, proc, "the restarted group's resume")
    restarted = _resumed(run)["step"] - 1
    # from the last checkpoint, not from the phase's start
    assert restarted >= struck, (restarted, struck)

    # 3. two checkpoints after the restart, then kill -9, then the newest damaged
    wait_for(lambda: sum(step(m) > restarted for m in _ckpts(run)) >= 2, 600, proc,
             "two more checkpoints")
    kill9(proc)
    assert not (run / P1 / "step.json").exists(), "the kill must land mid-phase"
    newest, before = _ckpts(run)[-1].parent, _ckpts(run)[-2].parent
    before_step = step(before / "meta.json")  # pruned as the re-run goes on
    adapter = newest / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    r = run_cli(*ARGS, f"run_dir={run}")
    assert r.returncode == 0, r.stdout[-4000:]
    assert f"checkpoint {newest} is damaged (adapter.safetensors has 100 bytes" in r.stdout
    assert _summary(run)["resumed_from_step"] == before_step
    _same_student(run, reference)
