"""The step's patch masks: from the batch (iBOT block / random masks) or from the teacher (AttMask).

Either way the result is one (G*B, P) bool tensor for the G global views, crop-major like the
crops, True where the student sees the mask token. Runs whose objectives read no patch masks get None.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..data.attmask import attmask, draw_batch_ratio
from ..data.rng import Stream
from ..objectives.base import StepState


class StepMasks:
    """Builds the masks of each step (``enabled``: an objective reads them); ``needs_attention`` says
    whether the teacher must return its last-block CLS attention (AttMask) in the forward that makes
    the targets."""

    def __init__(self, cfg: Config, rank: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.masking = cfg.masking
        self.strategy = cfg.masking.attmask
        self.needs_attention = self.enabled and self.strategy != "none"
        self.seed = cfg.run.seed
        self.rank = rank

    def generator(self, step: int) -> torch.Generator:
        """AttMask's draws: a generator keyed on (seed, step, rank), so a resumed run draws the same."""
        key = np.random.SeedSequence([self.seed, step, self.rank, Stream.ATTMASK]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(key))

    def __call__(self, data_masks: list[torch.Tensor] | None, teacher: dict[str, torch.Tensor],
                 state: StepState) -> torch.Tensor | None:
        """(G*B, P) bool masks of this step (all False before ``masking.pred_start_epoch``), or None."""
        if not self.enabled:
            return None
        if not self.needs_attention:
            if data_masks is None:
                raise ValueError("the patch objective needs masks from the data: set masking.shape "
                                 "(block or random) or masking.attmask")
            return torch.cat(data_masks)
        attention = teacher["cls_attention"].detach()
        if state.epoch < self.masking.pred_start_epoch:
            return torch.zeros(attention.shape, dtype=torch.bool, device=attention.device)
        g = self.generator(state.step)
        m = self.masking
        ratio = draw_batch_ratio(m.pred_ratio, m.pred_ratio_var, g)
        # the authors' loop draws the hint count's ratio separately (a second get_pred_ratio call)
        hint_ratio = draw_batch_ratio(m.pred_ratio, m.pred_ratio_var, g) if self.strategy == "hint" else None
        masks = attmask(attention.float().cpu(), ratio, self.strategy, masking_prob=m.masking_prob, generator=g,
                        hint_ratio=hint_ratio)
        return masks.to(attention.device)
