"""The user errors the command line turns into one-line messages, importable without torch.

Each is defined here, not in the (torch-importing) module that raises it, so that ``ssl-distill``
can catch them without importing torch for commands that never run a model (``--help``,
``submit``, ``report``). The modules that raise them re-export them under their old names
(``ssl_distill.data.folder.DataError`` is this ``DataError``).
"""
from __future__ import annotations

__all__ = ["AnnotationError", "CheckpointError", "DataError", "NonFiniteLossError"]


class DataError(ValueError):
    """A problem with the data on disk (missing folder, no images, too many corrupt files...)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


class AnnotationError(ValueError):
    """A ground-truth or boxes file that cannot be read (message names the file)."""
