"""The user errors the command line turns into one-line messages, and the one handler that does it;
importable without torch.

Each error is defined here, not in the (torch-importing) module that raises it, so that ``ssl-distill``
can catch them without importing torch for commands that never run a model (``--help``,
``submit``, ``report``). The modules that raise them re-export them under their old names
(``ssl_distill.data.folder.DataError`` is this ``DataError``). :func:`run_command` is the handler both
``ssl-distill`` and the tools' own ``python -m`` entry points run their subcommand through.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
from collections.abc import Callable

from .config import ConfigError

__all__ = ["INTERRUPTED_EXIT", "AnnotationError", "CheckpointError", "DataError", "NonFiniteLossError", "path_problem",
           "run_command"]


class DataError(ValueError):
    """A problem with the data on disk (missing folder, no images, too many corrupt files...)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


class AnnotationError(ValueError):
    """A ground-truth or boxes file that cannot be read (message names the file)."""


#: the exit code of a command stopped at once by Ctrl-C: 128 + SIGINT (130), as a shell reports it (and as
#: launch/submit.signal_exit_code gives for a run a signal stopped)
INTERRUPTED_EXIT = 128 + int(signal.SIGINT)


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``handler(args)``, the exit code of a subcommand.

    A user error (bad config, data, checkpoint, annotations, non-finite loss, invalid argument, a path or disk
    the file system refuses: :func:`path_problem`) prints one line to stderr and raises SystemExit(1) instead of
    a traceback; a Ctrl-C that stops the
    command at once (training: the second one) prints one line and raises SystemExit(130).
    """
    code = 1
    try:
        return handler(args)
    except ConfigError as e:
        message = f"config error: {e}"
    except (DataError, CheckpointError, NonFiniteLossError, AnnotationError, ValueError) as e:
        # ValueError: argument checks of the evaluation tools (e.g. a holdout fraction outside (0, 1))
        message = f"error: {e}"
    except KeyboardInterrupt as e:  # its message, where there is one, says what is on disk
        message, code = f"interrupted (Ctrl-C){': ' + str(e) if str(e) else ''}", INTERRUPTED_EXIT
    except OSError as e:
        problem = path_problem(e)
        if problem is None:  # not the user's paths or disk: a bug, with its traceback
            raise
        message = f"error: {problem}"
    print(message, file=sys.stderr)
    raise SystemExit(code)


def path_problem(error: OSError) -> str | None:
    """One sentence for what the user's file system refused (a file where a folder must go or the reverse, no
    permission, a full disk), or None for any other OSError. Every write is atomic (:mod:`ssl_distill.atomic`),
    so a refused one left nothing half-written."""
    where = error.filename if error.filename is not None else "a file"
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return (f"cannot create {where}: a file is in the way (at that path or at one of its parent folders); "
                "name another output path or move the file")
    if isinstance(error, IsADirectoryError):
        return f"{where} is a folder where a file is needed: name a file"
    if isinstance(error, PermissionError):
        return f"permission denied: {where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device (writing {where}): free some space and run the same command again; "
                "files are written whole or not at all, so what was there before is intact")
    return None
