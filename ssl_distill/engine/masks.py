"""The step's patch masks: from the batch (iBOT block / random masks) or from the teacher (AttMask).

Either way the result is one (G*B, P) bool tensor for the G global views, crop-major like the
crops, True where the student sees the mask token. Runs whose objectives read no patch masks get None.
:meth:`StepMasks.build` also gives the flat positions of the masked patches, counted on the host (the
loader's masks are host tensors; AttMask's are made on the host from one copy of the attention), so
that gathering the masked rows on a GPU never waits for it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..data.attmask import attmask, draw_batch_ratio
from ..data.masking import true_positions
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

    def build(self, data_masks: list[torch.Tensor] | None, teacher: dict[str, torch.Tensor], state: StepState,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's (G*B, P) bool masks (all False before ``masking.pred_start_epoch``) and the (M,) flat
        positions of their True entries (:func:`~ssl_distill.data.masking.true_positions`), both on ``device``
        (None: where the masks are made: the data masks', or AttMask's attention's), or None when no
        objective reads masks.

        Made on the host: the loader's masks are host tensors, and AttMask copies the teacher's attention to
        the host once (the one extra wait for a GPU in its step); the positions are counted there.
        """
        if not self.enabled:
            return None
        if not self.needs_attention:
            if data_masks is None:
                raise ValueError("the patch objective needs masks from the data: set masking.shape "
                                 "(block or random) or masking.attmask")
            masks = torch.cat(data_masks)
            device = device or masks.device
        else:
            attention = teacher["cls_attention"].detach()
            device = device or attention.device
            if state.epoch < self.masking.pred_start_epoch:
                masks = torch.zeros(attention.shape, dtype=torch.bool)
            else:
                g = self.generator(state.step)
                m = self.masking
                ratio = draw_batch_ratio(m.pred_ratio, m.pred_ratio_var, g)
                # the authors' loop draws the hint count's ratio separately (a second get_pred_ratio call)
                hint_ratio = draw_batch_ratio(m.pred_ratio, m.pred_ratio_var, g) if self.strategy == "hint" else None
                masks = attmask(attention.float().cpu(), ratio, self.strategy, masking_prob=m.masking_prob,
                                generator=g, hint_ratio=hint_ratio)
        return to_device(masks, device), to_device(true_positions(masks), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without waiting for a GPU: a host tensor goes through pinned memory there
    (a copy from pageable memory waits for the device's queue to drain), asynchronously."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
