"""What one official checkpoint layout declares, and what converting a backbone to timm's names gives
(:func:`ssl_distill.checkpoints.layouts.to_timm_layout`)."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Rename:
    """One backbone key rename, ``pattern.sub(repl, key)``; ``swiglu``: the key belongs to a packed SwiGLU MLP."""

    pattern: re.Pattern[str]
    repl: str
    swiglu: bool = False


@dataclass(frozen=True)
class Evidence:
    """What converting a backbone state dict showed, for recognising the layout it came in."""

    original: Mapping[str, Tensor]  # the file's names (prefix removed)
    state: Mapping[str, Tensor]  # timm's names
    source: str  # the checkpoint entry it came from ("teacher", "state_dict", "(whole file)" ...)
    dropped: Sequence[str]  # mask tokens left out
    changed: frozenset[str]  # names of the layouts whose renames or register step changed something


@dataclass(frozen=True)
class Layout:
    """One official checkpoint layout: its training-only keys, how its keys become timm's, how to recognise it.

    Attributes:
        name: what :class:`ssl_distill.checkpoints.LoadedBackbone` reports as ``format``.
        recognise: True when the converted state came in this layout (asked in the order of
            :data:`ssl_distill.checkpoints.layouts.LAYOUTS`).
        mask_tokens: keys used only by masked-image-modelling training: dropped and reported.
        renames: applied to every key, in order, after those of the layouts before this one.
        registers: after renaming, moves the layout's register tokens to timm's ``reg_token`` in the
            state (and the origin map, timm name -> file name); True when there were any.
    """

    name: str
    recognise: Callable[[Evidence], bool]
    mask_tokens: tuple[str, ...] = ()
    renames: tuple[Rename, ...] = ()
    registers: Callable[[dict[str, Tensor], dict[str, str]], bool] | None = None


@dataclass
class TimmState:
    """A backbone state dict in timm's names, with what the conversion found."""

    state: dict[str, Tensor]
    origin: dict[str, str]  # timm name -> name in the file
    dropped: list[str]
    layout: str  # the recognising layout's name: "dino", "ibot", "dinov2", "dinov3", "timm"
    swiglu: bool
    registers_converted: bool
    pos_embed: str = "learned"  # "learned" (timm's VisionTransformer names) | "rope" (its DINOv3 Eva names)
    mask_token: Tensor | None = None  # the file's mask token (1, D), dropped from ``state``
