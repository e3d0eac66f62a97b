"""Distributed setup without a scheduler: node lists, environment mapping, stop signals, and a
two-process gloo run under torchrun (identical teachers, bit-identical resume)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_distill.checkpoints import load_file
from ssl_distill.config import load_config
from ssl_distill.engine import stop
from ssl_distill.engine.distributed import DistEnv, expand_nodelist, port_from_job_id
from ssl_distill.engine.train import Trainer

from test_end_to_end import CONFIG, assert_same_teacher_and_center, make_folder, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node07", ["node07"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("learnfair[0218,1104-1105].fair", ["learnfair0218.fair", "learnfair1104.fair", "learnfair1105.fair"]),
    ],
)
def test_expand_nodelist(text, expected):
    assert expand_nodelist(text) == expected


@pytest.mark.parametrize("bad", ["node[01-04", "node01-04]", "node[a-b]", "node[4-2]", "a,,b", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_env_from_torchrun_wins():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    assert DistEnv.from_environ(env) == DistEnv(3, 8, 1, "h1", 1234, "torchrun")


def test_env_from_slurm_step():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    e = DistEnv.from_environ(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (9, 16, 1, "gpu07", "slurm")
    assert e.master_port == port_from_job_id("123456") == 20000 + 123456 % 40000
    assert DistEnv.from_environ({**env, "MASTER_PORT": "4000"}).master_port == 4000


def test_env_batch_script_without_srun_is_one_process():
    assert DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}) == DistEnv()


def test_env_from_submitit_local():
    env = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
           "SUBMITIT_LOCAL_JOB_ID": "4242"}
    e = DistEnv.from_environ(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (1, 2, 1, "127.0.0.1", "submitit-local")
    assert DistEnv.from_environ({}) == DistEnv()


def test_signal_handlers_record_and_restore():
    before = signal.getsignal(signal.SIGUSR2)
    with stop.StopSignals() as s:
        assert s.poll() == stop.NONE
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.poll() == stop.STOP
        os.kill(os.getpid(), signal.SIGUSR2)
        assert s.poll() == stop.REQUEUE
        os.kill(os.getpid(), signal.SIGTERM)  # a later TERM does not downgrade the request
        assert s.poll() == stop.REQUEUE
    assert signal.getsignal(signal.SIGUSR2) is before


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("dist") / "train", 16, 0)


def test_signal_checkpoints_the_finished_step_and_resume_is_exact(train_dir, tmp_path, monkeypatch):
    """SIGUSR2 during step 5: step 5 completes, the checkpoint holds 6 steps, nothing is lost."""
    over = tiny_overrides(train_dir, tmp_path / "a") + ["run.checkpoint_every=100"]
    reference = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "ref")))
    reference.fit()

    trainer = Trainer(load_config(CONFIG, over))
    real_step = trainer.train_step

    def step_and_signal(crops, step, *masks):
        out = real_step(crops, step, *masks)
        if step == 5:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(trainer, "train_step", step_and_signal)
    last = trainer.fit()
    assert last["stopped"] == "requeue" and last["step"] == 6 and last["requeues"] == 1
    assert load_file(tmp_path / "a" / "checkpoint.pth")["step"] == 6
    resumed = Trainer(load_config(CONFIG, over))
    assert resumed.state.step == 6 and resumed.state.requeues == 1
    assert "stopped" not in resumed.fit()
    for (name, a), b in zip(resumed.teacher.state_dict().items(), reference.teacher.state_dict().values()):
        assert torch.equal(a, b), name


def test_requeue_limit_is_reported(train_dir, tmp_path, monkeypatch):
    trainer = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path) + ["run.max_requeues=0"]))
    real_step = trainer.train_step

    def step_and_signal(crops, step, *masks):
        out = real_step(crops, step, *masks)
        os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(trainer, "train_step", step_and_signal)
    last = trainer.fit()
    assert last["stopped"] == "requeue-limit" and last["step"] == 1 and last["requeues"] == 0


def torchrun(config_overrides: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ssl-distill train``; the whole process group is
    killed if it outlives the timeout (a hung rank must not outlive the test)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ssl_distill.cli", "train", str(CONFIG), *config_overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in 300 s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_gloo_processes_agree_and_resume_bit_identically(train_dir, tmp_path):
    """torchrun, 2 processes: the run equals itself when interrupted at step 5 and resumed."""
    full = torchrun(tiny_overrides(train_dir, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    part = tiny_overrides(train_dir, tmp_path / "part")
    first = torchrun(part + ["run.stop_at_step=5"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(part)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    a, b = load_file(tmp_path / "full" / "checkpoint.pth"), load_file(tmp_path / "part" / "checkpoint.pth")
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 8  # 32 images / (4 x 2) x 2 epochs
    assert len(a["rngs"]) == 2 and not torch.equal(a["rngs"][0]["torch"], a["rngs"][1]["torch"])
    assert_same_teacher_and_center(a, b)


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_with_its_error(train_dir, tmp_path):
    res = torchrun(tiny_overrides(train_dir, tmp_path / "crash"), env={"SSL_DISTILL_FAIL_AT": "1:7"})
    assert res.returncode != 0
    assert "rank 1: training failed at step 7: RuntimeError: injected failure on rank 1" in res.stdout + res.stderr
    ckpt = load_file(tmp_path / "crash" / "checkpoint.pth")  # the last good checkpoint is intact
    assert ckpt["step"] == 6  # checkpoint_every=3


def test_a_signal_during_the_last_step_lets_the_run_finish(train_dir, tmp_path, monkeypatch):
    trainer = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path)))
    real_step = trainer.train_step

    def step_and_signal(crops, step, *masks):
        out = real_step(crops, step, *masks)
        if step == trainer.total_steps - 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(trainer, "train_step", step_and_signal)
    last = trainer.fit()
    assert "stopped" not in last and last["step"] == trainer.total_steps
    assert load_file(tmp_path / "checkpoint.pth")["requeues"] == 0
