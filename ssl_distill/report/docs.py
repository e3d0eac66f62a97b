"""Tables in ``docs/`` kept current by the commands that produce them.

A generated table sits between two HTML comments in a Markdown file, ``<!-- begin NAME -->`` and
``<!-- end NAME -->``, where NAME names the command that writes it (``experiments/compare_scenes.py``);
:func:`update_section` replaces what is between them and leaves the prose around it alone. The markers are
invisible on GitHub; a file without them gets the section appended at its end, markers included.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..atomic import atomic_write


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- begin {name} -->", f"<!-- end {name} -->"


def read_section(path: str | Path, name: str) -> str | None:
    """The text between the markers of ``name`` in ``path`` (None when the file or the markers are absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    begin, end = _markers(name)
    found = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), path.read_text(), flags=re.S)
    return None if found is None else found.group(1)


def update_section(path: str | Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of ``name`` in the Markdown file ``path`` (written atomically)."""
    path = Path(path)
    begin, end = _markers(name)
    old = path.read_text() if path.is_file() else ""
    body = text.rstrip("\n") + "\n"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), flags=re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: f"{begin}\n{body}{end}", old, count=1)
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + f"{begin}\n{body}{end}\n"
    with atomic_write(path) as tmp:
        tmp.write_text(new)
