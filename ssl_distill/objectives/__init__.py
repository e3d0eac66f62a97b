"""Self-distillation objectives, one module each."""
from .dino import DINOLoss, teacher_statistics

__all__ = ["DINOLoss", "teacher_statistics"]
