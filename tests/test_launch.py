"""``ssl-distill submit`` against a real one-node SLURM cluster (``.ci/slurm-up`` starts it) and
through submitit's local executor: a 2-task gloo job, preemption + requeue, a crashing rank,
a cancelled job."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

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


#: seconds each stage of the local-executor job may take: several times what it took on 2 cores under a load
#: of 6 (1 s to submit, 22 s for both tasks to import torch, join and log their first step, 2 s for the rest
#: of the 8 steps, 10 s until the command has seen the job end); 390 s in all, well inside the 600 s the
#: command had as one wait, and a stage that fails says which it was
LOCAL_STAGES = {"submission": 60, "start": 180, "step": 60, "checkpoint": 90}


class NotYet(Exception):
    """Raised by a stage's check: what is still missing (the failure's reason if the stage ends there)."""


class StagedJob:
    """``ssl-distill submit --local --wait`` watched stage by stage. A stage that fails or runs past its limit
    stops the job (the command's whole process group: its tasks too) and fails the test naming the stage and
    why, with the command's output and every task's log."""

    def __init__(self, cmd: list[str], out: Path, logs: Path, limits: dict[str, float]) -> None:
        self.out, self.limits, self.done = out, limits, {}
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = logs / "submit.out", logs / "submit.err"
        with self.stdout.open("w") as o, self.stderr.open("w") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, cwd=ROOT, start_new_session=True)
        self.t0 = time.monotonic()

    def wait(self, stage: str, check: Callable[[], None]) -> None:
        """Poll ``check`` (it returns when the stage is done, raises :class:`NotYet` otherwise) until it passes,
        the command exits without it passing, or the stage's limit is over."""
        start = time.monotonic()
        while True:
            exited = self.proc.poll() is not None
            try:
                check()
                self.done[stage] = time.monotonic() - start
                return
            except NotYet as e:
                why = str(e)
            if exited:
                self.fail(stage, f"{why}, and the submit command exited with code {self.proc.returncode}")
            if time.monotonic() - start > self.limits[stage]:
                self.fail(stage, f"{why} after the stage's {self.limits[stage]:.0f} s")
            time.sleep(0.2)

    def job_id(self) -> str:
        m = re.search(r"submitted job (\S+)", self.stdout.read_text())
        if m is None:
            raise NotYet("no job id printed")
        return m.group(1)

    def fail(self, stage: str, why: str) -> NoReturn:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        done = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.done.items()) or "none"
        parts = [f"local job failed at the {stage} stage: {why} ({time.monotonic() - self.t0:.0f} s in all; "
                 f"stages done: {done})",
                 f"--- ssl-distill submit (exit code {self.proc.returncode}) ---",
                 self.stdout.read_text()[-3000:], self.stderr.read_text()[-3000:]]
        logs = sorted((self.out / "submitit").glob("*_log.*"))
        for log in logs:
            parts += [f"--- {log} ---", log.read_text(errors="replace")[-4000:]]
        if not logs:
            parts.append(f"--- no task log in {self.out / 'submitit'} ---")
        raise AssertionError("\n".join(parts))


def run_local_job(cmd: list[str], out: Path, logs: Path, steps: int, tasks: int,
                  limits: dict[str, float] = LOCAL_STAGES) -> StagedJob:
    """Run ``cmd`` (a ``submit --local --wait`` of ``tasks`` tasks training ``steps`` steps into ``out``)
    through its stages: submission (the job id printed), start (each task's log, and the run's first step
    logged), step (the last step logged), checkpoint (the command exits 0 with the last step of a
    ``tasks``-process run in ``checkpoint.pth``). Returns the finished job."""
    job = StagedJob(cmd, out, logs, limits)
    job.wait("submission", job.job_id)

    def started() -> None:
        missing = [t for t in range(tasks) if not (out / "submitit" / f"{job.job_id()}_{t}_log.out").is_file()]
        if missing:
            raise NotYet(f"no log of task(s) {missing}")
        if not logged_steps(out):
            raise NotYet(f"no step in {out / 'log.jsonl'}")

    def stepped() -> None:
        if logged_steps(out)[-1] < steps:
            raise NotYet(f"the last step logged is {logged_steps(out)[-1]}, not {steps}")

    def checkpointed() -> None:
        if job.proc.poll() != 0:
            raise NotYet("the submit command has not exited with code 0")
        ckpt = load_file(out / "checkpoint.pth") if (out / "checkpoint.pth").is_file() else None
        if ckpt is None or (ckpt["step"], ckpt["world_size"]) != (steps, tasks):
            raise NotYet(f"no checkpoint.pth of step {steps} of a {tasks}-process run" + (
                f" (it holds step {ckpt['step']} of a {ckpt['world_size']}-process run)" if ckpt else ""))

    for stage, check in (("start", started), ("step", stepped), ("checkpoint", checkpointed)):
        job.wait(stage, check)
    return job


@pytest.mark.slow
def test_local_executor_runs_the_same_two_task_job(train_dir, tmp_path):
    out = tmp_path / "local"
    cmd = [sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), *tiny_overrides(train_dir, out),
           "--local", "--tasks-per-node", "2", "--cpus-per-task", "1", "--wait"]
    job = run_local_job(cmd, out, tmp_path / "logs", steps=8, tasks=2)
    printed = job.stdout.read_text()
    assert "submitted job" in printed and "'step': 8" in printed, printed


def _fake_submit(tmp_path: Path, out: Path, body: str) -> list[str]:
    """A stand-in for ``ssl-distill submit``: prints a job id, writes task 0's log, then runs ``body``."""
    script = tmp_path / "fake_submit.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "print('submitted job 77 locally', flush=True)\n"
        f"logs = pathlib.Path({str(out / 'submitit')!r})\n"
        "logs.mkdir(parents=True)\n"
        "(logs / '77_0_log.out').write_text('task 0 says hello')\n"
        "(logs / '77_0_log.err').write_text('Traceback ...\\nRuntimeError: the rendezvous timed out')\n"
        + body)
    return [sys.executable, str(script)]


def test_a_failing_local_job_says_which_stage_and_shows_the_task_logs(tmp_path):
    """The helper the local-executor test runs through: a job that dies before its tasks start names the
    start stage and prints the task logs; one that hangs is stopped at its stage's limit."""
    out = tmp_path / "died"
    with pytest.raises(AssertionError) as failed:
        run_local_job(_fake_submit(tmp_path, out, "sys.exit(3)\n"), out, tmp_path / "logs1", steps=8, tasks=2)
    text = str(failed.value)
    assert text.startswith("local job failed at the start stage: no log of task(s) [1], and the submit command "
                           "exited with code 3")
    assert "stages done: submission" in text and "ssl-distill submit (exit code 3)" in text
    assert "RuntimeError: the rendezvous timed out" in text and "task 0 says hello" in text

    out = tmp_path / "hung"
    limits = dict(LOCAL_STAGES, start=2)
    t0 = time.monotonic()
    stopped = r"failed at the start stage: no log of task\(s\) \[1\] after the stage's 2 s \(\d+ s in all"
    with pytest.raises(AssertionError, match=stopped):
        run_local_job(_fake_submit(tmp_path, out, "time.sleep(600)\n"), out, tmp_path / "logs2", steps=8, tasks=2,
                      limits=limits)
    assert time.monotonic() - t0 < 30  # stopped at the limit, process group and all


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


def test_a_job_sbatch_refuses_is_one_line_and_leaves_no_trace(slurm, train_dir, tmp_path):
    out = tmp_path / "refused"
    res = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), *overrides(train_dir, out),
                          "--partition", "no_such_partition"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip().splitlines()[-1]  # after sbatch's own lines, which submitit passes on
    assert err.startswith("error: sbatch refused the job (") and "no_such_partition" in err
    assert err.endswith("nothing was queued: `sinfo` lists the partitions and their limits")
    assert not out.exists()  # neither the run directory nor submitit's pickled job
    res = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), *overrides(train_dir, out),
                          "--nodes", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "argument --nodes: must be >= 1, got 0" in res.stderr and not out.exists()


def test_a_job_the_partition_can_never_run_is_flagged_at_submission(slurm, train_dir, tmp_path):
    cpus = os.cpu_count() or 1  # more CPUs per task than the one-node cluster has: SLURM queues it, never runs it
    cmd = [sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), *overrides(train_dir, tmp_path / "big"),
           "--cpus-per-task", str(64 * cpus)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    job = re.search(r"submitted job (\S+)", res.stdout)
    try:
        assert res.returncode == 0 and job, res.stdout + res.stderr
        assert (f"warning: SLURM holds job {job.group(1)} with reason PartitionConfig: it asks for more than its "
                "partition gives") in res.stderr, res.stderr
        assert f"`scancel {job.group(1)}` and submit with less" in res.stderr
    finally:
        if job:
            subprocess.run(["scancel", job.group(1)], timeout=30)
    ok = subprocess.run([sys.executable, "-c", "from ssl_distill.launch.submit import never_runs; "
                         "print(never_runs('999999'))"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ok.stdout.strip() == "None"  # a job squeue does not know: no warning
