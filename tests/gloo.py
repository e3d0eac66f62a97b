"""Run a test function in several fresh processes joined in a gloo process group (CPU collectives)."""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    faulthandler.enable(all_threads=True)  # a fatal signal (an abort in C++) prints every thread's Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank closes its connections while a peer may still be talking to it
    finally:
        dist.destroy_process_group()
    # fn passed: leave without interpreter finalization. Once (CI, torch 2.14) a child aborted with
    # "terminate called without an active exception" and no Python error; an abort in teardown would fail
    # the test for something it does not check (the launcher tests still exit training processes the
    # normal way), and faulthandler shows where one elsewhere comes from.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group; an exception
    (a failed assertion) in any of them fails the caller."""
    torch.multiprocessing.spawn(_gloo_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
