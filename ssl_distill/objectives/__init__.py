"""Self-distillation objectives, one module each (see ``base.py`` for the interface)."""
from .base import Objective, Reads, StepState
from .build import build_objectives
from .center import Center
from .dino import DINOLoss, teacher_statistics
from .gram import GramLoss
from .ibot import PatchLoss
from .koleo import KoLeoLoss
from .odis import ObjectLoss

__all__ = ["Objective", "Reads", "StepState", "Center", "DINOLoss", "PatchLoss", "KoLeoLoss", "ObjectLoss",
           "GramLoss", "build_objectives", "teacher_statistics"]
