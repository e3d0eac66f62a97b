"""Typed configuration: dataclasses, YAML recipes, dotted command-line overrides, strict keys."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CropsConfig:
    """Multi-crop views, DINO's defaults (Caron et al. 2021, Sec. 3.1 and main_dino.py).

    Global views get blur with probability ``blur_p[0]`` (first) / ``blur_p[1]`` (second) and the
    second global view is solarized with ``solarize_p``; local views are blurred with ``blur_p[2]``.
    """

    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 10
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # second global view only
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
