"""Stop requests from signals, honoured at the next step boundary.

SLURM (through submitit's ``--signal=USR2@90``) sends SIGUSR2 before a time limit and on
preemption: checkpoint the step that just finished, then requeue. SIGTERM (``scancel``, a
preemption with SLURM's own requeue) and the first Ctrl-C: checkpoint, then stop. The signal
handler only records the request; the loop reads it between steps, so the checkpoint holds a
consistent state and no work is lost: the step in flight finishes before the checkpoint is written.
A second Ctrl-C stops at once (KeyboardInterrupt); the last checkpoint on disk stays whole.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from . import distributed as du

NONE, STOP, REQUEUE = 0, 1, 2
NAMES = {STOP: "stop", REQUEUE: "requeue"}


class StopSignals:
    """Context manager installing the handlers; ``poll()`` gives the request agreed by all ranks."""

    def __init__(self) -> None:
        self.code = NONE
        self.signum = 0  # the number of the signal that made the request in force
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        wanted = {signal.SIGTERM: STOP, signal.SIGINT: STOP}
        if hasattr(signal, "SIGUSR2"):
            wanted[signal.SIGUSR2] = REQUEUE
        for sig, code in wanted.items():
            self._previous[sig] = signal.signal(sig, self._handler(code))
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handler(self, code: int):
        def handle(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.code != NONE:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            if code > self.code:
                self.code, self.signum = code, signum
            print(f"rank {du.rank()}: received {signal.Signals(signum).name}: checkpointing when the current "
                  f"step ends, then {NAMES[self.code]}", file=sys.stderr, flush=True)
        return handle

    def poll(self) -> int:
        """NONE, STOP or REQUEUE; the maximum over ranks, so all ranks stop at the same step."""
        return du.all_reduce_max(self.code)

    def signal_name(self, request: int) -> str:
        """The name of the signal behind ``request``, the agreed :meth:`poll` (``"SIGTERM"`` ...), the same on
        every rank (the highest number among the ranks that made that request); all ranks call it."""
        return signal.Signals(du.all_reduce_max(self.signum if self.code == request else 0)).name
