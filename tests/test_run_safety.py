"""Nothing a user types loses a run: outputs that would replace a run's files, stale files of an earlier run,
resumes that would break the schedule, signals, and paths in the way; each ends in one sentence."""
from __future__ import annotations

import pytest

from test_bad_input import cli_error
from test_end_to_end import CONFIG, make_folder, tiny_overrides


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("safety") / "train", 8, 0)


# ---------------------------------------------------------------- a file where a folder is expected
@pytest.mark.parametrize("below", [False, True])
def test_a_file_as_the_run_directory_is_refused_in_one_sentence(below, train_dir, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = notes / "run" if below else notes
    for command in ("train", "submit"):
        extra = ["--local"] if command == "submit" else []
        err = cli_error([command, str(CONFIG), *tiny_overrides(train_dir, out), *extra], capsys)
        assert f"run.output_dir={out}" in err and "not a folder" in err, err
    assert notes.read_text() == "mine"


def test_a_file_as_the_discover_output_is_refused_before_any_work(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = cli_error(["discover", str(tmp_path / "no_run"), "--images", str(tmp_path), "--out", str(notes)], capsys)
    assert f"--out={notes} is a file, not a folder" in err
    assert notes.read_text() == "mine"
