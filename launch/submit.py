"""``ssl-distill submit``: the same config and overrides as ``ssl-distill train``, as a submitit job.

One task per GPU (or per CPU process), the run directory as submitit's folder
(``<output_dir>/submitit``: job pickles and each task's ``<job>_<task>_log.out/.err``).
On SLURM, sbatch gets ``--signal=USR2@<delay>`` and ``--requeue``; the training loop turns
SIGUSR2 into a checkpoint of the step that just finished, and rank 0 then requeues the job
(``scontrol requeue``), which resumes from that step with the same data order. ``--local`` runs
the same job through submitit's local executor (same processes, same requeue path).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ssl_distill.atomic import check_output_folder, missing_folders, remove_empty_folders
from ssl_distill.cli_args import submit_arguments as add_arguments  # noqa: F401  (options: torch-free)
from ssl_distill.config import Config, load_config
from ssl_distill.errors import DataError

#: submitit's local executor restarts a job whose task exits with this code (its LOCAL_REQUEUE_RETURN_CODE)
LOCAL_REQUEUE_EXIT = 144


def slurm_job_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The id ``scontrol`` knows this job by (array tasks: ``<array job>_<task>``); None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def signal_exit_code(name: str) -> int:
    """128 + the signal's number, what a shell reports for a process that signal ended: 130 for SIGINT (Ctrl-C),
    143 for SIGTERM, 140 for SIGUSR2 (Linux numbers)."""
    return 128 + int(signal.Signals[name])


def exit_code_after(last: dict[str, Any], rank: int) -> int:
    """Act on how training ended (requeue if asked and possible) and return the process exit code.

    ``last`` is ``train()``'s record; ``stopped`` is absent when the schedule finished (exit code 0). A run
    stopped by a signal, its checkpoint written, exits with :func:`signal_exit_code` of it (``signal``), so
    that a script can tell it from a finished run; a requeue exits as its scheduler expects (0 after
    ``scontrol requeue``, :data:`LOCAL_REQUEUE_EXIT` under submitit's local executor).
    """
    stopped = last.get("stopped")
    if stopped is None:
        return 0
    step = last["step"]
    code = signal_exit_code(last.get("signal", "SIGTERM"))
    if stopped == "requeue-limit":
        if rank == 0:
            print(f"not requeued: run.max_requeues={last['requeues']} reached at step {step}; the checkpoint "
                  "holds that step, submit again (or raise run.max_requeues) to continue", file=sys.stderr)
        return 1
    if stopped == "requeue":
        if "SUBMITIT_LOCAL_JOB_ID" in os.environ:
            return LOCAL_REQUEUE_EXIT if rank == 0 else 0
        job = slurm_job_id()
        if job is None:
            if rank == 0:
                print(f"stopped at step {step} on SIGUSR2 outside a scheduler: run the same command to resume",
                      file=sys.stderr)
            return code
        if rank == 0:
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                print(f"could not requeue job {job}: {res.stderr.strip()}; the checkpoint holds step {step}, "
                      "submit the same command again to continue", file=sys.stderr)
                return 1
            print(f"requeued job {job} (requeue {last['requeues']}); it resumes at step {step}", file=sys.stderr)
        return 0
    if rank == 0:
        print(f"stopped at step {step} (exit code {code}); run the same command to resume", file=sys.stderr)
    return code


@dataclass
class TrainJob:
    """What submitit pickles and runs in every task: train the run, then requeue if it was signalled.

    ``threads``: torch threads per task (0: SLURM_CPUS_PER_TASK, else torch's default).
    """

    cfg: Config
    threads: int = 0

    def __call__(self) -> dict[str, Any]:
        import torch

        from ssl_distill.engine.distributed import DistEnv
        from ssl_distill.engine.train import train

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        last = train(self.cfg)
        code = exit_code_after(last, DistEnv.from_environ().rank)
        if last.get("stopped") is not None:
            # an unfinished run leaves no result pickle; submitit's watcher keeps waiting for the requeued job
            raise SystemExit(code)
        return last

    def checkpoint(self) -> Any:
        """submitit's own signal handler (active before and after the loop): requeue as is; the run
        directory's checkpoint says where to resume."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def parse_slurm_args(items: list[str]) -> dict[str, str]:
    """``["mail_type=END", ...]`` -> ``{"mail_type": "END", ...}`` (extra sbatch options)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-arg expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_executor(args: argparse.Namespace, folder: Path, name: str) -> Any:
    """A submitit AutoExecutor for SLURM (or the local executor with ``--local``)."""
    import submitit

    if not args.local and shutil.which("sbatch") is None:
        raise ValueError("sbatch not found: submit from a SLURM login node, or use --local to run here")
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else "slurm")
    params: dict[str, Any] = dict(
        name=name, nodes=args.nodes, tasks_per_node=tasks, timeout_min=args.time,
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if not args.local:
        extra: dict[str, Any] = {"requeue": True, **parse_slurm_args(args.slurm_arg)}
        params.update(
            slurm_partition=args.partition, slurm_signal_delay_s=args.signal_delay,
            # a task that exits with an error takes the others down at once, instead of at their
            # next collective's timeout
            slurm_srun_args=["--kill-on-bad-exit=1"], slurm_additional_parameters=extra,
        )
        for key in ("account", "qos", "constraint", "exclude"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


#: squeue reasons of a pending job that no amount of waiting starts (the request exceeds the partition)
NEVER_RUNS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints")


def never_runs(job_id: str) -> str | None:
    """The squeue reason of pending job ``job_id`` when it is one of :data:`NEVER_RUNS` (SLURM sets it at
    submission), else None (also when squeue cannot tell)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T %r"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    state, _, reason = out.stdout.strip().partition(" ")
    return reason if state == "PENDING" and reason in NEVER_RUNS else None


def submitit_failure() -> type[Exception]:
    """submitit's error for a job its scheduler refused (sbatch's message in it)."""
    from submitit.core.utils import FailedJobError

    return FailedJobError


def run(args: argparse.Namespace) -> int:
    parse_slurm_args(args.slurm_arg)  # every argument is checked before anything is written
    overrides = list(args.overrides)
    if args.max_requeues is not None:
        overrides.append(f"run.max_requeues={args.max_requeues}")
    cfg = load_config(args.config, overrides)  # config errors surface here, not in the queue
    out = check_output_folder(Path(cfg.run.output_dir).resolve(), "run.output_dir")
    cfg.run.output_dir = str(out)  # jobs may start in another working directory
    train_dir = Path(cfg.data.train_dir).resolve()
    if not train_dir.is_dir():
        raise DataError(f"data.train_dir={cfg.data.train_dir}: no such folder")
    cfg.data.train_dir = str(train_dir)
    for key in ("train_dir", "val_dir"):
        if getattr(cfg.knn, key):
            setattr(cfg.knn, key, str(Path(getattr(cfg.knn, key)).resolve()))
    folder = out / "submitit"
    created = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    executor = build_executor(args, folder, args.job_name or f"ssl-{out.name}")
    try:
        job = executor.submit(TrainJob(cfg, threads=args.cpus_per_task or 0))
    except submitit_failure() as e:  # sbatch said no: leave no trace of the attempt
        for path in set(folder.iterdir()) - before:
            path.unlink()
        remove_empty_folders(created)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"sbatch refused the job ({' '.join(lines[-2:]) or type(e).__name__}); nothing was "
                         "queued: `sinfo` lists the partitions and their limits") from e
    tasks = (args.tasks_per_node or args.gpus_per_node or 1) * args.nodes
    where = "locally" if args.local else f"to SLURM (partition {args.partition or 'default'})"
    print(f"submitted job {job.job_id} {where}: {tasks} task(s) on {args.nodes} node(s)")
    print(f"run directory: {out}")
    print(f"logs: {folder}/{job.job_id}_<task>_log.out and .err (task 0: {folder}/{job.job_id}_0_log.out)")
    stuck = None if args.local else never_runs(job.job_id)
    if stuck is not None:
        print(f"warning: SLURM holds job {job.job_id} with reason {stuck}: it asks for more than its partition "
              f"gives (`sinfo -o '%P %c %m %l'` lists CPUs, memory and time limits) and will not start; "
              f"`scancel {job.job_id}` and submit with less", file=sys.stderr)
    if not args.wait:
        return 0
    try:
        last = job.results()[0]  # task 0's record; waits for the job
    except Exception as e:  # submitit re-raises the job's failure with its traceback
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(last)
    return 0
