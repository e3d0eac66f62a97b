"""Process groups: where rank and world come from (torchrun, SLURM, submitit's local executor),
setting the group up, and the few collectives the engine needs.

Every helper is a no-op with one process, so the training loop has a single code path.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from ..runtime import is_distributed


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------- the environment
_BRACKETS = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(text: str) -> list[str]:
    """SLURM host list -> host names, in SLURM's order.

    ``"node[01-04,07]"`` -> node01 node02 node03 node04 node07 (zero padding kept);
    ``"a1,b[2-3]"`` -> a1 b2 b3; several bracket groups multiply out:
    ``"r[1-2]n[1-2]"`` -> r1n1 r1n2 r2n1 r2n2.
    """
    names: list[str] = []
    for item in _split_top_level(text.strip()):
        parts = _BRACKETS.split(item)  # literal, group, literal, group, ..., literal
        if any("[" in p or "]" in p for p in parts[::2]):  # unbalanced or nested brackets
            raise ValueError(f"cannot parse SLURM node list {text!r} (item {item!r})")
        expanded = [parts[0]]
        for group, literal in zip(parts[1::2], parts[2::2]):
            suffixes = _expand_ranges(group, text)
            expanded = [e + s + literal for e in expanded for s in suffixes]
        names.extend(expanded)
    return names


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    if depth != 0 or any(not it for it in items):
        raise ValueError(f"cannot parse SLURM node list {text!r}")
    return items


def _expand_ranges(group: str, text: str) -> list[str]:
    out: list[str] = []
    for part in group.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if m is None:
            raise ValueError(f"cannot parse SLURM node list {text!r} (range {part!r})")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"cannot parse SLURM node list {text!r} (range {part!r} is decreasing)")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port in [20000, 60000) derived from the job id, so requeues reuse it and
    concurrent jobs on a node rarely collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 40000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the launcher's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm | submitit-local

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> "DistEnv":
        """torchrun's variables win; then SLURM's (``srun`` tasks); then submitit's local executor.

        SLURM: rank = SLURM_PROCID, world = SLURM_NTASKS, local rank = SLURM_LOCALID, master =
        first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST), port from the job id unless
        MASTER_PORT is set. A batch script without ``srun`` (no SLURM_STEP_ID) is one process.
        """
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", 0)), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun",
            )
        if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
            world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            job_id = env.get("SLURM_JOB_ID", "0")
            return cls(
                rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
                master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodes)[0],
                master_port=int(env.get("MASTER_PORT") or port_from_job_id(job_id)), source="slurm",
            )
        if "SUBMITIT_LOCAL_GLOBALID" in env:
            return cls(
                rank=int(env["SUBMITIT_LOCAL_GLOBALID"]), world_size=int(env.get("SUBMITIT_LOCAL_NTASKS", 1)),
                local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", 0)), master_addr="127.0.0.1",
                master_port=int(env.get("MASTER_PORT") or port_from_job_id(env.get("SUBMITIT_LOCAL_JOB_ID", "0"))),
                source="submitit-local",
            )
        return cls()


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device, timeout_min: float) -> Iterator[torch.device]:
    """Join the job's process group for the duration of the block; yields this process's device.

    gloo on CPU, NCCL on CUDA (one GPU per process: ``cuda:<local rank>``). Collectives time out
    after ``timeout_min`` so a dead or stuck rank fails the job instead of hanging it. Does nothing
    with one process, or when a group already exists (the caller owns it then).
    """
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if env.world_size == 1 or is_distributed():
        yield device
        return
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        # torchrun's agent may already host the store at MASTER_PORT: env:// knows how to join it
        init_method="env://" if env.source == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_min),
    )
    try:
        yield device
        barrier()  # on success, no rank closes its connections while a peer may still be talking to it
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- collectives
def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
