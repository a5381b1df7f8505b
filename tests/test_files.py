"""Directory locks leave nothing behind: no lock file after the command, no empty folder after a
failed one; a folder that already held files keeps them."""

from __future__ import annotations

import os

import pytest

from histoprism._core.files import LOCK_FILE, directory_lock


def test_a_failed_command_leaves_no_folder_and_no_lock(tmp_path):
    out = tmp_path / "pred"
    with pytest.raises(RuntimeError), directory_lock(out, "predicting"):
        assert (out / LOCK_FILE).read_text().startswith(str(os.getpid()))
        raise RuntimeError("the slide failed")
    assert not out.exists()


def test_a_finished_command_leaves_its_files_and_no_lock(tmp_path):
    out = tmp_path / "pred"
    with directory_lock(out, "predicting"):
        (out / "a.h5ad").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["a.h5ad"]


def test_a_failure_keeps_a_folder_that_had_files(tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "earlier.h5ad").write_text("x")
    with pytest.raises(RuntimeError), directory_lock(out):
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["earlier.h5ad"]


def test_the_lock_can_be_taken_again_after_release(tmp_path):
    for _ in range(3):
        with directory_lock(tmp_path / "run", "training") as d:
            assert (d / LOCK_FILE).exists()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_failure_keeps_an_empty_folder_the_user_made(tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    with pytest.raises(RuntimeError), directory_lock(out):
        raise RuntimeError
    assert out.is_dir() and list(out.iterdir()) == []
