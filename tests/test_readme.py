"""The README is a guide that cannot rot: every command in its code blocks parses.

Each ``ssl-distill`` line (also through ``torchrun ... -m ssl_distill.cli``) goes through the real parser with
the command line's own rules (options, then ``key=value`` overrides), every override key must exist in the
config schema, every recipe it names must load, and every script or file a line names must exist. Every
subcommand answers ``--help``. The parser is torch-free, so this test takes a second.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ssl_distill.cli import COMMANDS, build_parser
from ssl_distill.config import ConfigError, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(text: str, language: str = "bash") -> list[str]:
    """The bodies of the fenced code blocks of ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """Shell words of each command in a block: continuation lines joined, comments and ``&&`` chains split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(words)
    return out


README_COMMANDS = [words for block in code_blocks(README.read_text()) for words in commands(block)]
#: the README's commands that run ``ssl-distill`` (also as ``torchrun ... -m ssl_distill.cli``), whole
CLI_COMMANDS = [w for w in README_COMMANDS if w[0] == "ssl-distill" or "ssl_distill.cli" in w]
#: their ``ssl-distill`` arguments (from the subcommand on)
CLI_LINES = [w[w.index("ssl_distill.cli") + 1:] if "ssl_distill.cli" in w else w[1:] for w in CLI_COMMANDS]


def test_the_readme_has_commands_to_check():
    assert len(CLI_LINES) >= 20
    assert README_COMMANDS[0] == ["bash", ".ci/setup"] and README_COMMANDS[1] == ["ssl-distill", "demo"]


@pytest.mark.parametrize("argv", CLI_LINES, ids=[" ".join(a)[:60] for a in CLI_LINES])
def test_every_ssl_distill_line_parses(argv):
    """What ``ssl_distill.cli.run`` accepts before it runs anything: the options, then key=value overrides whose
    keys exist (checked against the recipe the line names, which must load)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    assert all("=" in a and not a.startswith("-") for a in extra), f"unrecognised arguments {extra}"
    overrides = list(getattr(args, "overrides", None) or []) + extra
    if extra:
        assert hasattr(args, "overrides"), f"{argv[0]} takes no key=value overrides"
    config = getattr(args, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), f"{config} is not in the repository"
        load_config(ROOT / config, overrides)
    else:
        apply_overrides({}, overrides)  # every key must exist in the schema


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_every_subcommand_answers_help(name, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([name, "--help"])
    assert stop.value.code == 0 and "usage: ssl-distill" in capsys.readouterr().out


def test_files_and_links_the_readme_names_exist():
    text = README.read_text()
    named = set(re.findall(r"\b((?:configs|benchmarks|experiments|docs|\.ci|tests)/[\w./-]+\.(?:yaml|py|md|png)|"
                           r"\.ci/[\w-]+)\b", text))
    named |= {m for m in re.findall(r"\]\(([\w./-]+)(?:#[\w-]*)?\)", text)}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the README names files that do not exist: {missing}"
    for words in README_COMMANDS:
        if words[0] in ("python", "python3") and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), words


def test_a_wrong_key_in_a_readme_line_would_fail():
    """The check has teeth: a misspelt override is caught the way the parametrized test catches it."""
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(ROOT / "configs/dino_vit_small16.yaml", ["optim.lrr=0.1"])
