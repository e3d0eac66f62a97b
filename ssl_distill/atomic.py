"""Atomic writes: a file (or a folder) appears under its name complete, or not at all.

Every write that must not leave half a file behind goes through :func:`atomic_write`: training
checkpoints, the saved config, results JSON, exported weights, feature caches, the file-list cache,
generated dataset splits. The content is written under a temporary name in the same folder,
``.<name>.tmp-<pid>`` (:func:`temporary_path`), flushed to disk, then renamed over the final name
with ``os.replace`` (atomic within one file system). A failure removes the temporary; a process
killed mid-write leaves it behind, and :func:`remove_stale_temporaries` finds such leftovers by the
same convention.

Standard library only: ``data`` and ``report`` sit below ``checkpoints`` and write atomically too.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "check_output_folder", "missing_folders", "remove_empty_folders",
           "remove_stale_temporaries", "temporary_path"]


def temporary_path(path: Path, pid: int | str | None = None) -> Path:
    """Where :func:`atomic_write` writes ``path`` before the rename: ``.<name>.tmp-<pid>`` beside it.

    ``pid`` defaults to this process's id; ``"*"`` gives the glob pattern of every process's temporary.
    """
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to (a file, or a folder), then rename it.

    Leaving the block without an error fsyncs a file and renames the temporary over ``path`` with
    ``os.replace`` (a folder is renamed as it is: ``path`` must then be absent or an empty folder).
    An error removes the temporary and leaves ``path`` as it was. ``path``'s folder is created
    if needed; a temporary left by an earlier process with the same id is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def check_output_folder(path: str | os.PathLike[str], key: str) -> Path:
    """``path`` as a folder to write into: it may be a folder or not exist yet (it is created later).

    Something else in the way (a file at ``path`` or at one of its parents) raises ValueError naming
    ``key`` (``run.output_dir``, ``--out`` ...) before any work, instead of a FileExistsError at the
    first write.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            where = "is a file" if p == path else f"lies under {p}, which is a file"
            raise ValueError(f"{key}={path} {where}, not a folder: name a folder (it is created if missing)")
    return path


def missing_folders(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: what creating ``path`` makes,
    for :func:`remove_empty_folders` to take back after a failed start."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first, as :func:`missing_folders` lists them) while each is empty; stop at the
    first that is not (another process may have started writing in it meanwhile)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def remove_stale_temporaries(folder: Path) -> list[tuple[Path, int]]:
    """Delete the temporary files of writes killed before their rename; returns (path, bytes).

    Call it only where no write is in progress (rank 0, before training starts): a ``kill -9`` in
    :func:`atomic_write` leaves its ``.<name>.tmp-<pid>`` behind, and repeated preemptions of a
    large model would fill a quota with them. Finished files are never touched.
    """
    removed = []
    for tmp in sorted(folder.glob(temporary_path(Path("*"), "*").name)):
        if tmp.is_file():
            size = tmp.stat().st_size
            tmp.unlink()
            removed.append((tmp, size))
    return removed
