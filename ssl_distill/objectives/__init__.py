"""Self-distillation objectives, one module each (see ``base.py`` for the interface)."""
from .base import Objective, StepState
from .dino import DINOLoss, teacher_statistics
from .ibot import PatchLoss
from .koleo import KoLeoLoss
from .odis import ObjectLoss

__all__ = ["Objective", "StepState", "DINOLoss", "PatchLoss", "KoLeoLoss", "ObjectLoss", "teacher_statistics"]
