"""The import order of the packages: no module imports from a package above its own level.

Levels, lowest first; a module may import from its own level or lower ones (within its own package in any
order), and two packages of one level must not import each other, directly or through others:

0. ``errors``, ``config``, ``runtime``, ``cli_args``, ``atomic`` (the base; torch-free where they are today)
1. ``data``   2. ``models``   3. ``objectives``   4. ``checkpoints``   5. ``engine``
6. ``eval`` (the top-level ``eval/`` folder) and ``report``   7. ``launch`` (the top-level ``launch/`` folder)
8. ``demo``, ``cli``

Every ``.py`` under ``ssl_distill/``, ``eval/`` (as ``ssl_distill.eval``) and ``launch/`` (as
``ssl_distill.launch``) is parsed with ``ast``; module-level and function-level imports count alike
(function-level ones only keep ``ssl-distill --help`` fast), relative ones resolved.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREE = {"ssl_distill": ROOT / "ssl_distill", "ssl_distill.eval": ROOT / "eval", "ssl_distill.launch": ROOT / "launch"}

LEVELS = {
    "ssl_distill": 0, "ssl_distill.errors": 0, "ssl_distill.config": 0, "ssl_distill.runtime": 0,
    "ssl_distill.cli_args": 0, "ssl_distill.atomic": 0, "ssl_distill.hardware": 0, "ssl_distill.memory": 0,
    "ssl_distill.eval_constants": 0, "ssl_distill.weighted_knn": 0,
    "ssl_distill.data": 1,
    "ssl_distill.models": 2,
    "ssl_distill.objectives": 3,
    "ssl_distill.checkpoints": 4,
    "ssl_distill.engine": 5,
    "ssl_distill.eval": 6, "ssl_distill.report": 6,
    "ssl_distill.launch": 7,
    "ssl_distill.demo": 8, "ssl_distill.cli": 8,
}

# Upward imports known and accepted (each entry must still occur, so the set cannot go stale): none.
KNOWN: set[str] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (a submodule where ``from package import submodule`` names one)


def module_names(tree: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under each root (``__init__.py`` names the package)."""
    out = {}
    for package, folder in tree.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def find_imports(tree: dict[str, Path], prefix: str = "ssl_distill") -> list[Import]:
    """Every import of a ``prefix`` module in the tree: module- and function-level, relative ones resolved."""
    modules = module_names(tree)
    found = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(node, importer, is_package)
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            found += [Import(importer, t) for t in targets if t == prefix or t.startswith(prefix + ".")]
    return found


def unit(module: str) -> str:
    """The entry of :data:`LEVELS` a module belongs to: its package (or base module) below ``ssl_distill``."""
    return ".".join(module.split(".")[:2])


def unplaced(tree: dict[str, Path], levels: dict[str, int]) -> list[str]:
    """The packages (or base modules) of the tree that have no level."""
    return sorted({unit(module) for module in module_names(tree)} - set(levels))


def violations(imports: list[Import], levels: dict[str, int]) -> list[str]:
    """The upward imports, as ``importer -> imported (level a -> level b)``."""
    up = set()
    for imp in imports:
        a, b = levels.get(unit(imp.importer)), levels.get(unit(imp.imported))
        if a is not None and b is not None and b > a:
            up.add(f"{imp.importer} -> {imp.imported} (level {a} -> level {b})")
    return sorted(up)


def same_level_cycles(imports: list[Import], levels: dict[str, int]) -> list[list[str]]:
    """Cycles between packages of one level, each as the sorted packages that reach one another."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        a, b = unit(imp.importer), unit(imp.imported)
        if a != b and a in levels and levels.get(b) == levels[a]:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in graph}
    cycles = {tuple(sorted(n for n in reachable[node] if node in reachable[n]))
              for node in graph if node in reachable[node]}
    return sorted(list(c) for c in cycles)


def test_no_import_points_to_a_higher_level() -> None:
    imports = find_imports(TREE)
    assert len({i.importer for i in imports}) > 50, "the parser found too few importing modules"
    missing = unplaced(TREE, LEVELS)
    assert not missing, "modules without a level (add them to LEVELS):\n" + "\n".join(missing)
    up = violations(imports, LEVELS)
    new = [v for v in up if v not in KNOWN]
    assert not new, "imports pointing to a higher level:\n" + "\n".join(new)
    gone = sorted(KNOWN - set(up))
    assert not gone, "KNOWN entries that no longer occur (remove them from KNOWN):\n" + "\n".join(gone)


def test_no_cycle_between_packages_of_one_level() -> None:
    cycles = same_level_cycles(find_imports(TREE), LEVELS)
    assert not cycles, "packages of one level importing each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.fixture
def planted(tmp_path: Path) -> dict[str, Path]:
    """A small tree: pkg/low.py (level 0), pkg/mid/ (level 1, imports low), pkg/high.py (level 2)."""
    pkg = tmp_path / "pkg"
    (pkg / "mid").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "high.py").write_text("from .mid import core\n")
    (pkg / "mid" / "__init__.py").write_text("from .core import Y\n")
    (pkg / "mid" / "core.py").write_text("from ..low import X\nY = X\n")
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "__init__.py").write_text("from pkg.low import X\n")
    return {"pkg": pkg, "pkg.side": tmp_path / "side"}


PLANTED_LEVELS = {"pkg": 0, "pkg.low": 0, "pkg.mid": 1, "pkg.side": 1, "pkg.high": 2}


def test_the_checker_passes_a_clean_tree_and_resolves_relative_imports(planted: dict[str, Path]) -> None:
    imports = find_imports(planted, prefix="pkg")
    assert {(i.importer, i.imported) for i in imports} == {
        ("pkg.high", "pkg.mid.core"), ("pkg.mid", "pkg.mid.core"), ("pkg.mid.core", "pkg.low"),
        ("pkg.side", "pkg.low"),
    }
    assert violations(imports, PLANTED_LEVELS) == [] and unplaced(planted, PLANTED_LEVELS) == []
    assert same_level_cycles(imports, PLANTED_LEVELS) == []


def test_the_checker_catches_a_planted_upward_import(planted: dict[str, Path]) -> None:
    core = planted["pkg"] / "mid" / "core.py"
    core.write_text(core.read_text() + "\n\ndef later():\n    from pkg import high\n    return high\n")
    assert violations(find_imports(planted, prefix="pkg"), PLANTED_LEVELS) == [
        "pkg.mid.core -> pkg.high (level 1 -> level 2)"]


def test_the_checker_catches_a_cycle_within_one_level_and_an_unplaced_module(planted: dict[str, Path]) -> None:
    (planted["pkg.side"] / "__init__.py").write_text("from pkg.low import X\n\n\ndef f():\n    from pkg.mid import Y\n")
    (planted["pkg"] / "mid" / "core.py").write_text("from ..low import X\nfrom pkg.side import X as Z\nY = X\n")
    (planted["pkg"] / "new.py").write_text("X = 2\n")
    assert same_level_cycles(find_imports(planted, prefix="pkg"), PLANTED_LEVELS) == [["pkg.mid", "pkg.side"]]
    assert unplaced(planted, PLANTED_LEVELS) == ["pkg.new"]
