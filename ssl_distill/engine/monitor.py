"""Run monitoring: JSON-lines log, optional TensorBoard, collapse detection."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any


class JsonlLogger:
    """Appends one JSON object per line to ``path`` (and mirrors scalars to TensorBoard if asked)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional extra
                raise RuntimeError(
                    "run.tensorboard=true needs the tensorboard package: pip install 'ssl-distill[tensorboard]'"
                ) from e
            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class CollapseMonitor:
    """Warns when the teacher's outputs sit at a collapsed state for ``window`` iterations.

    Uniform collapse: per-sample entropy >= 0.98 log K. Dimension collapse: per-sample entropy
    <= 0.02 log K while the batch-mean distribution is far from uniform (KL >= 0.5 log K), i.e.
    every image is sent to the same few prototypes.
    """

    def __init__(self, out_dim: int, window: int) -> None:
        self.log_k = math.log(out_dim)
        self.window = window
        self.run_uniform = 0
        self.run_onehot = 0
        self.warned: set[str] = set()

    def update(self, entropy: float, kl_uniform: float, step: int, iters: int = 1) -> str | None:
        """Feed the statistics of the last ``iters`` iterations; returns a warning text if one fires."""
        uniform = entropy >= 0.98 * self.log_k
        onehot = entropy <= 0.02 * self.log_k and kl_uniform >= 0.5 * self.log_k
        self.run_uniform = self.run_uniform + iters if uniform else 0
        self.run_onehot = self.run_onehot + iters if onehot else 0
        msg = None
        if self.run_uniform >= self.window and "uniform" not in self.warned:
            msg = (
                f"step {step}: teacher outputs have stayed near uniform (entropy {entropy:.3f} of max "
                f"{self.log_k:.3f}) for {self.run_uniform} iterations: possible collapse to the uniform "
                "distribution; consider a lower teacher temperature or a smaller center momentum"
            )
            self.warned.add("uniform")
        elif self.run_onehot >= self.window and "onehot" not in self.warned:
            msg = (
                f"step {step}: teacher outputs have been one-hot on few prototypes (entropy {entropy:.3f}, "
                f"KL to uniform {kl_uniform:.3f}) for {self.run_onehot} iterations: possible collapse to one "
                "dimension; consider a higher teacher temperature or stronger centering"
            )
            self.warned.add("onehot")
        if msg is not None:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return msg
