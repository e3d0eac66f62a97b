"""ssl_distill.atomic: one temporary-name convention, written files appear whole or not at all."""
import os

import pytest

from ssl_distill.atomic import atomic_write, remove_stale_temporaries, temporary_path


def test_file_is_renamed_into_place_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "sub" / "results.json"
    with atomic_write(target) as tmp:
        assert tmp == tmp_path / "sub" / f".results.json.tmp-{os.getpid()}"
        tmp.write_text("{}\n")
        assert not target.exists()
    assert target.read_text() == "{}\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_folder_is_written_whole_and_a_leftover_temporary_is_replaced(tmp_path):
    target = tmp_path / "train"
    leftover = temporary_path(target)
    (leftover / "a").mkdir(parents=True)  # a killed earlier process with this pid
    with atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "0.png").write_bytes(b"png")
    assert sorted(p.name for p in target.iterdir()) == ["0.png"]
    assert not leftover.exists()


def test_stale_temporaries_of_the_convention_are_found(tmp_path):
    for name in ("checkpoint.pth", "knn.json"):
        temporary_path(tmp_path / name, 123).write_bytes(b"\0" * 3)
    (tmp_path / "notes.tmp-444").write_text("not ours")
    (tmp_path / "knn.json").write_text("{}")
    removed = remove_stale_temporaries(tmp_path)
    assert [(p.name, size) for p, size in removed] == [(".checkpoint.pth.tmp-123", 3), (".knn.json.tmp-123", 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.json", "notes.tmp-444"]
