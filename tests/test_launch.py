"""``ssl-distill submit`` against a real one-node SLURM cluster (``.ci/slurm-up`` starts it) and
through submitit's local executor: a 2-task gloo job, preemption + requeue, a crashing rank,
a cancelled job."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_distill.checkpoints import load_file

from test_end_to_end import CONFIG, assert_same_teacher_and_center, make_folder, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
STEPS = 120  # 32 images / (4 per task x 2 tasks) x 30 epochs


def cluster_state() -> str | None:
    """Why the SLURM tests cannot run here, or None when the node takes jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools are not installed"
    try:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer"
    states = state.stdout.split()
    if state.returncode != 0 or not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node takes jobs (sinfo: {state.stdout.strip() or state.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = cluster_state()
    if reason is not None:
        message = f"{reason}; start a local cluster with `sudo bash .ci/slurm-up`"
        if os.environ.get("SSL_DISTILL_REQUIRE_SLURM"):  # .ci/run sets it: never skip silently in CI
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("launch") / "train", 16, 0)


def overrides(train_dir: Path, out: Path) -> list[str]:
    return tiny_overrides(train_dir, out) + ["optim.epochs=30", "run.log_every=1", "run.checkpoint_every=50"]


def submit(train_dir: Path, out: Path, *flags: str, env: dict[str, str] | None = None) -> str:
    """Run ``ssl-distill submit`` for a 2-task CPU job; returns the job id."""
    cmd = [sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), *overrides(train_dir, out),
           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "15", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"submitted job (\S+)", res.stdout)
    assert m, res.stdout
    assert f"{out / 'submitit'}/{m.group(1)}_0_log.out" in res.stdout  # says where the logs are
    return m.group(1)


def job_info(job_id: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait_final(job_id: str, timeout: float = 300) -> dict[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job_info(job_id)}")


def logged_steps(out: Path) -> list[int]:
    log = out / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]


def wait_for_step(out: Path, job_id: str, step: int, timeout: float = 300) -> int:
    """Poll the log until ``step`` is done; returns the last step logged at that moment."""
    end = time.time() + timeout
    while time.time() < end:
        steps = logged_steps(out)
        if steps and steps[-1] >= step:
            return steps[-1]
        assert job_info(job_id)["JobState"] not in FINAL_STATES, "job ended before the test could interrupt it"
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {out / 'log.jsonl'} after {timeout} s")


def interrupted(train_dir: Path, out: Path, *scancel_flags: str) -> tuple[str, int, dict[str, str]]:
    """Submit, let 10 steps finish, ``scancel`` with ``scancel_flags``, wait for the end.

    Returns (job id, last step logged before the signal, final ``scontrol show job`` fields).
    """
    job = submit(train_dir, out)
    done = wait_for_step(out, job, 10)
    subprocess.run(["scancel", *scancel_flags, job], check=True)
    return job, done, wait_final(job)


def task_log(out: Path, job_id: str, task: int, ext: str = "out") -> str:
    return (out / "submitit" / f"{job_id}_{task}_log.{ext}").read_text()


@pytest.fixture(scope="module")
def uninterrupted(slurm, train_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "full"
    job = submit(train_dir, out)
    info = wait_final(job)
    assert info["JobState"] == "COMPLETED", (info, task_log(out, job, 0, "err")[-3000:])
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_trains_to_the_end(uninterrupted):
    ckpt = load_file(uninterrupted / "checkpoint.pth")
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and len(ckpt["rngs"]) == 2
    assert logged_steps(uninterrupted)[-1] == STEPS
    job = next((uninterrupted / "submitit").glob("*_1_log.out")).name.split("_")[0]
    assert "Job completed successfully" in task_log(uninterrupted, job, 0)


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(uninterrupted, train_dir, tmp_path):
    out = tmp_path / "preempted"
    job, done, info = interrupted(train_dir, out, "--signal=USR2")  # what SLURM sends before a time limit
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    stdout, stderr = task_log(out, job, 0), task_log(out, job, 0, "err")
    stopped = int(re.search(r"stopped at step (\d+) \(requeue\)", stderr).group(1))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", stdout).group(1))
    assert resumed == stopped >= done  # nothing that finished before the signal is redone
    assert f"requeued job {job}" in stderr
    a, b = load_file(uninterrupted / "checkpoint.pth"), load_file(out / "checkpoint.pth")
    assert b["step"] == STEPS and b["requeues"] == 1
    assert_same_teacher_and_center(a, b)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_crashing_rank_fails_the_job_once(slurm, train_dir, tmp_path):
    out = tmp_path / "crash"
    job = submit(train_dir, out, env={"SSL_DISTILL_FAIL_AT": "1:63"})
    info = wait_final(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert "RuntimeError: injected failure on rank 1 at step 63" in task_log(out, job, 1, "err")
    ckpt = load_file(out / "checkpoint.pth")  # the run directory holds the last good checkpoint
    assert ckpt["step"] == 60  # the end of epoch 15 (4 steps per epoch)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_job_saves_its_step_and_is_not_requeued(slurm, train_dir, tmp_path):
    out = tmp_path / "cancelled"
    job, done, info = interrupted(train_dir, out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    time.sleep(2)
    stopped = int(re.search(r"stopped at step (\d+) \(stop\)", task_log(out, job, 0, "err")).group(1))
    assert stopped >= done and load_file(out / "checkpoint.pth")["step"] == stopped


@pytest.mark.slow
def test_local_executor_runs_the_same_two_task_job(train_dir, tmp_path):
    out = tmp_path / "local"
    cmd = [sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), *tiny_overrides(train_dir, out),
           "--local", "--tasks-per-node", "2", "--cpus-per-task", "1", "--wait"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "submitted job" in res.stdout and "'step': 8" in res.stdout
    ckpt = load_file(out / "checkpoint.pth")
    assert ckpt["step"] == 8 and ckpt["world_size"] == 2


def test_submit_rejects_a_config_typo_before_queueing(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), "optim.lrr=0.1", "--local"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 1 and "optim.lr" in res.stderr and "Traceback" not in res.stderr


def test_submit_rejects_a_malformed_sbatch_option_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), f"run.output_dir={out}",
                          "--slurm-arg", "mail_type"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 1 and "--slurm-arg expects KEY=VALUE, got 'mail_type'" in res.stderr
    assert not out.exists()
