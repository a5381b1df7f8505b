"""Crash safety of run directories: the resumable checkpoint is one unit (a kill at any instant of
its write resumes to the uninterrupted run's exact weights), one process trains into a directory
at a time, killed runs' leftovers are removed, and damaged files are one-line input errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from histoprism._core import files as hio
from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism._core.files import (
    atomic_directory,
    complete_directory,
    directory_lock,
    old_name,
    pid_alive,
    remove_partials,
)
from histoprism.cli import app
from histoprism.io import rundir as checkpoint
from histoprism.io.cohort import Cohort
from histoprism.io.rundir import load_run, load_tensors, read_json_object
from histoprism.synthetic.cohort import make_cohort, tiny
from histoprism.training import api as train_mod
from histoprism.training import loop as loop_mod
from histoprism.training.api import train

ENCODER = "synthetic"
# a small network on a small cohort: the kill test resumes a few dozen times
SMALL = dict(model=dict(hidden=8, n_layers=1, n_heads=1, cross_heads=1, ff_mult=1))


@pytest.fixture(scope="module")
def micro_cohort(tmp_path_factory) -> Path:
    """5 slides of 30-40 spots, 40 genes, 8-d embeddings, one cancer type."""
    config = dataclasses.replace(
        tiny(), n_slides=5, n_cancers=1, spots=(30, 40), n_genes=40, embed_dim=8,
        targeted_fraction=0.0, targeted_genes=10, ceiling_draws=1,
    )  # fmt: skip
    return make_cohort(tmp_path_factory.mktemp("micro"), config=config)


@pytest.fixture(scope="module")
def fit(micro_cohort):
    """``train`` of the small network on the micro cohort, the cohort and its slides read once
    (the reading is deterministic and not what these tests are about)."""
    cohort = Cohort(micro_cohort)
    data = train_mod.load_training_data(cohort, ENCODER)

    def fit(out: Path, *, epochs: int, resume: bool = False, config: dict = SMALL) -> Path:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_mod, "Cohort", lambda *a, **kw: cohort)
            mp.setattr(train_mod, "load_training_data", lambda *a, **kw: data)
            return train(
                micro_cohort, ENCODER, out, epochs=epochs, config=config, resume=resume,
                progress=False,
            )  # fmt: skip

    return fit


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


class Killer:
    """Counts the file-system operations a block makes (renames, removals, directory creations,
    file writes) and calls ``at_each(k)`` just before the k-th: what is on disk then is what a
    kill at that instant leaves (a real kill runs no ``finally``, no clean-up)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at_each):
        self.at_each, self.count, self.armed = at_each, 0, False
        for owner, name in [
            (os, "replace"),
            (os, "rename"),
            (os, "unlink"),
            (os, "rmdir"),
            (os, "mkdir"),
            (checkpoint, "save_file"),  # safetensors writes without Python's os functions
            (Path, "write_text"),
        ]:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        def op(*args, **kwargs):
            if self.armed:
                self.armed = False  # at_each may copy files itself
                self.count += 1
                try:
                    self.at_each(self.count)
                finally:
                    self.armed = True
            return real(*args, **kwargs)

        return op


def snapshot(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)


# --- the checkpoint is one unit -------------------------------------------------------------------
def _write(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (path / name).write_text(text)


def test_atomic_directory_shows_the_whole_old_or_the_whole_new_version(tmp_path, monkeypatch):
    """Kill the swap of a directory before each of its file-system operations: what a reader
    finds (complete_directory) is the whole old or the whole new content; an exception in the
    block leaves the old one."""
    old, new = {"a": "old a", "b": "old b"}, {"a": "new a", "b": "new b", "c": "new c"}
    target = tmp_path / "run" / "last"
    with atomic_directory(target) as tmp:
        _write(tmp, old)
    # a stale parked copy from an earlier kill after a swap: must not come back
    snapshot(target, old_name(target))
    _write(old_name(target), {"a": "stale"})
    snaps = tmp_path / "snaps"
    killer = Killer(monkeypatch, lambda k: snapshot(target.parent, snaps / str(k)))
    killer.armed = True
    with atomic_directory(target) as tmp:
        _write(tmp, new)
    killer.armed = False
    monkeypatch.undo()
    assert killer.count >= 6  # three writes, removal of the stale copy, two renames, clean-up
    seen = set()
    for k in range(1, killer.count + 1):
        found = complete_directory(snaps / str(k) / "last")
        assert found is not None, k
        content = {p.name: p.read_text() for p in found.iterdir()}
        assert content in (old, new), (k, content)
        seen.add(tuple(sorted(content)))
    assert len(seen) == 2  # both versions were seen: the swap happened inside the window
    assert {p.name: p.read_text() for p in target.iterdir()} == new
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]  # nothing left over
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        _write(tmp, {"a": "newer"})
        raise RuntimeError
    assert {p.name: p.read_text() for p in target.iterdir()} == new
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def digest(path: Path) -> str:
    """Names and bytes of the files under ``path`` that the next run may read: equal digests,
    equal disk states to it. A partial file or directory of the killed process is deleted unread
    (remove_partials; the resume test checks that none is left), so only its name counts."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if ".partial" in str(rel.parent):
            continue
        h.update(str(rel).encode() + b"\0")
        if p.is_file() and ".partial" not in p.name:
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def killed_checkpoints(fit, tmp_path_factory):
    """A 2-epoch run that copies its run directory before every file-system operation of both
    checkpoint writes (and after the last): one copy per distinct state a kill could leave
    (``digest``). Returns (the run, {(epoch, k): copy}, {epoch: operations})."""
    root = tmp_path_factory.mktemp("killed")
    run, snaps, seen, ops = root / "run", {}, set(), {}
    real_save = loop_mod._save_last
    with pytest.MonkeyPatch.context() as mp:
        epoch = {"now": 0}

        def at_each(k):
            copy = root / f"e{epoch['now']}_k{k}"
            snapshot(run, copy)
            if digest(copy) in seen:
                shutil.rmtree(copy)
            else:
                seen.add(digest(copy))
                snaps[epoch["now"], k] = copy

        killer = Killer(mp, at_each)

        def save_last(last, model, opt, best, state, history):
            epoch["now"], killer.count, killer.armed = state.epoch, 0, True
            real_save(last, model, opt, best, state, history)
            killer.armed, ops[state.epoch] = False, killer.count
            at_each(killer.count + 1)  # after the checkpoint's last operation

        mp.setattr(loop_mod, "_save_last", save_last)
        fit(run, epochs=2)
    return run, snaps, ops


def test_checkpoint_write_has_many_kill_points(killed_checkpoints):
    _, snaps, ops = killed_checkpoints
    # 5 files written each via a temporary name and a rename, the swap's renames and clean-up
    # (5 files and a folder removed at epoch 2), the users' history.csv
    assert ops[1] >= 14 and ops[2] >= ops[1] + 6, ops
    distinct = {e: sum(e == epoch for epoch, _ in snaps) for e in (1, 2)}
    assert distinct[1] >= 4 and distinct[2] >= 10, distinct


def test_resume_after_a_kill_at_any_point_of_the_checkpoint_is_the_uninterrupted_run(
    killed_checkpoints, fit, tmp_path
):
    """A kill at every instant of both checkpoint writes, then ``--resume``: the same weights,
    bit for bit, and the same history as the run that was not killed (RNG state needs no
    saving: every epoch reseeds from seed + epoch)."""
    run, snaps, _ = killed_checkpoints
    want = {name: load_tensors(run / name) for name in (keys.RUN_WEIGHTS, "last/model.safetensors")}
    want_history = pd.read_csv(run / keys.RUN_HISTORY).drop(columns="seconds")
    dead = str(dead_pid())
    resumed_from = []
    for (epoch, k), snap in sorted(snaps.items()):
        copy = tmp_path / snap.name
        snapshot(snap, copy)
        # the killed process's partial files carry its pid: give them a dead one
        for p in copy.iterdir():
            if f".{os.getpid()}.partial" in p.name:
                p.rename(copy / p.name.replace(f".{os.getpid()}.", f".{dead}."))
        last = complete_directory(copy / keys.RUN_LAST)
        state = json.loads((last / "state.json").read_text())["state"] if last else {"epoch": 0}
        resumed_from.append((state["epoch"], last.name if last else None))
        fit(copy, epochs=2, resume=True)
        for name, tensors in want.items():
            got = load_tensors(copy / name)
            assert got.keys() == tensors.keys()
            for key in tensors:
                assert torch.equal(got[key], tensors[key]), (epoch, k, name, key)
        history = pd.read_csv(copy / keys.RUN_HISTORY).drop(columns="seconds")
        pd.testing.assert_frame_equal(history, want_history)
        left = sorted(p.name for p in copy.iterdir() if p.name.startswith("."))
        assert left == [], (epoch, k, left)  # no partials, no parked checkpoint, no lock
    # kills before the first checkpoint, between the two, after the second, and between the
    # renames of a swap (last/ gone, the previous checkpoint parked) were among them
    assert {epoch for epoch, _ in resumed_from} == {0, 1, 2}
    assert (1, old_name(Path(keys.RUN_LAST)).name) in resumed_from


def test_resume_reads_the_history_of_its_checkpoint(killed_checkpoints, fit, tmp_path):
    """The users' history.csv may be damaged or ahead of the checkpoint: resume keeps the
    checkpoint's rows."""
    run, snaps, _ = killed_checkpoints
    copy = tmp_path / "run"
    first = min(k for e, k in snaps if e == 2)
    snapshot(snaps[2, first], copy)  # epoch 2's checkpoint begun: last/ is still epoch 1's
    (copy / keys.RUN_HISTORY).write_text("garbage\n")
    fit(copy, epochs=2, resume=True)
    pd.testing.assert_frame_equal(
        pd.read_csv(copy / keys.RUN_HISTORY).drop(columns="seconds"),
        pd.read_csv(run / keys.RUN_HISTORY).drop(columns="seconds"),
    )


def test_resume_from_a_checkpoint_without_its_own_history(killed_checkpoints, fit, tmp_path):
    """Checkpoints written before the history moved into last/ resume with the users' copy."""
    run, _, _ = killed_checkpoints
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / keys.RUN_LAST / keys.RUN_HISTORY).unlink()
    fit(copy, epochs=3, resume=True)
    assert pd.read_csv(copy / keys.RUN_HISTORY)["epoch"].tolist() == [1, 2, 3]


def test_resume_after_an_exception_in_the_checkpoint_write(fit, tmp_path, monkeypatch):
    """An exception (Ctrl-C) at either rename of epoch 2's swap, then resume in place: the
    exception's clean-up leaves a resumable run, and the weights of the uninterrupted one."""
    want = load_tensors(fit(tmp_path / "ref", epochs=2) / keys.RUN_WEIGHTS)
    real_replace, real_save = os.replace, loop_mod._save_last
    for nth in (1, 2):  # last -> .last.old, then the new checkpoint -> last
        swaps = []

        def replace(src, dst, *, nth=nth, swaps=swaps):
            if Path(dst).name in (keys.RUN_LAST, old_name(Path(keys.RUN_LAST)).name):
                swaps.append(dst)
                if len(swaps) == nth:
                    raise KeyboardInterrupt
            return real_replace(src, dst)

        def save_last(last, model, opt, best, state, history, *, replace=replace):
            with monkeypatch.context() as mp:
                if state.epoch == 2:
                    mp.setattr(os, "replace", replace)
                real_save(last, model, opt, best, state, history)

        out = tmp_path / f"run{nth}"
        with monkeypatch.context() as mp:
            mp.setattr(loop_mod, "_save_last", save_last)
            with pytest.raises(KeyboardInterrupt):
                fit(out, epochs=2)
        assert len(swaps) == nth
        last = complete_directory(out / keys.RUN_LAST)
        assert json.loads((last / "state.json").read_text())["state"]["epoch"] == 1
        fit(out, epochs=2, resume=True)
        got = load_tensors(out / keys.RUN_WEIGHTS)
        assert all(torch.equal(got[k], want[k]) for k in want), nth


# --- one process per run directory ---------------------------------------------------------------
HOLD = """
import sys
from histoprism._core.files import directory_lock
with directory_lock(sys.argv[1], "training"):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / 'run'`` (until it is killed)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"locked"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_second_process_cannot_train_into_a_locked_directory(holder, micro_cohort):
    out, proc = holder
    for model in ("histoprism", "ridge"):
        with pytest.raises(InputError) as err:
            train(micro_cohort, ENCODER, out, model=model, epochs=1, progress=False)
        msg = str(err.value)
        start = f"{out}: another histoprism process (pid {proc.pid}, training) is writing into"
        assert msg.startswith(start) and "\n" not in msg, msg
    assert sorted(p.name for p in out.iterdir()) == [hio.LOCK_FILE]  # nothing written
    # the CLI says it on one line and fails
    result = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["train", "--data", str(micro_cohort), "--encoder", ENCODER, "--out", str(out)]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {proc.pid}" in lines[0]
    # a killed holder leaves no lock behind: the kernel releases it
    proc.kill()
    proc.wait()
    with directory_lock(out):
        pass


def test_two_opens_in_one_process_conflict_and_release(tmp_path):
    """flock belongs to the open file description: a second lock in the same process fails too
    (so two threads or two in-process runs are guarded), and the lock is free after the block."""
    out = tmp_path / "run"
    with directory_lock(out, "predicting") as d:
        assert d == out and (out / hio.LOCK_FILE).read_text() == f"{os.getpid()} predicting\n"
        with pytest.raises(InputError, match=rf"\(pid {os.getpid()}, predicting\) is writing"):
            with directory_lock(out):
                pass
    with directory_lock(out):  # released, also after an exception
        with pytest.raises(RuntimeError), directory_lock(tmp_path / "other"):
            raise RuntimeError
    with directory_lock(tmp_path / "other"):
        pass


def test_the_lock_is_held_for_the_whole_training(micro_cohort, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real_fit = train_mod.fit_cancer_classifier  # the last step of train()

    def fit(*args, **kwargs):
        with pytest.raises(InputError, match="another histoprism process"):
            with directory_lock(out):
                pass
        seen.append(True)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train_mod, "fit_cancer_classifier", fit)
    train(micro_cohort, ENCODER, out, model="ridge", progress=False)
    assert seen
    with directory_lock(out):  # and released at the end
        pass


def test_no_fcntl_means_no_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(hio, "fcntl", None)  # Windows
    with directory_lock(tmp_path / "run"), directory_lock(tmp_path / "run"):
        pass


# --- leftovers of killed runs --------------------------------------------------------------------
def test_remove_partials_removes_dead_processes_leftovers_only(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    d = tmp_path / "run"
    (d / f".last.{dead}.partial").mkdir(parents=True)  # a killed checkpoint write
    (d / f".last.{dead}.partial" / "model.safetensors").write_bytes(b"x")
    gone = [f".last.{dead}.partial", f".history.{dead}.partial.csv", f".pred.v2.{dead}.partial.h5"]
    for name in gone[1:]:
        (d / name).write_text("x")
    kept = [
        f".history.{alive}.partial.csv",  # a live process is writing it
        "history.csv",
        f"x.{dead}.partial.h5",  # not a temporary name
        ".last.old",  # a parked checkpoint is no partial
        "sub",
    ]
    for name in kept:
        (d / name).write_text("x") if name != "sub" else (d / name).mkdir()
    (d / "sub" / f".a.{dead}.partial.h5").write_text("x")  # not recursive
    removed = remove_partials(d)
    assert sorted(p.name for p in removed) == sorted(gone)
    assert sorted(p.name for p in d.iterdir()) == sorted(kept)
    assert (d / "sub" / f".a.{dead}.partial.h5").exists()
    assert remove_partials(tmp_path / "missing") == []


def test_pid_alive(monkeypatch):
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid()) and not pid_alive(0)

    def kill(pid, sig):
        raise PermissionError  # a process of another user

    monkeypatch.setattr(os, "kill", kill)
    assert pid_alive(12345)


def test_training_removes_leftovers_of_a_killed_run(micro_cohort, tmp_path):
    out, dead = tmp_path / "run", dead_pid()
    out.mkdir()
    (out / f".model.{dead}.partial.safetensors").write_bytes(b"half a file")
    (out / f".last.{dead}.partial").mkdir()
    train(micro_cohort, ENCODER, out, model="ridge", progress=False)
    assert not [p for p in out.iterdir() if ".partial" in p.name]


# --- damaged run directories -----------------------------------------------------------------------
def _one_line(exc: InputError, path: Path, start: str) -> None:
    msg = str(exc)
    assert msg.startswith(f"{path}: {start}"), msg
    assert "\n" not in msg and exc.path == path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "directory"])
def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(InputError) as err:
        load_tensors(path)
    _one_line(err.value, path, "cannot read as safetensors (")


@pytest.mark.parametrize(
    "content, start",
    [
        (b'{"format_version": 1, "model"', "not valid JSON ("),  # truncated
        (b"\xff\xfe\x00garbage", "not valid JSON ("),  # not UTF-8
        (b"", "not valid JSON ("),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_damaged_config_json_is_one_line_naming_the_file(
    killed_checkpoints, tmp_path, content, start
):
    run = Path(shutil.copytree(killed_checkpoints[0], tmp_path / "run"))
    (run / keys.RUN_CONFIG).write_bytes(content)
    with pytest.raises(InputError) as err:
        load_run(run)
    _one_line(err.value, run / keys.RUN_CONFIG, start)


def test_damaged_weights_of_a_run_are_one_line(killed_checkpoints, tmp_path):
    run = Path(shutil.copytree(killed_checkpoints[0], tmp_path / "run"))
    weights = run / keys.RUN_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError) as err:
        load_run(run)
    _one_line(err.value, weights, "cannot read as safetensors (")


def test_damaged_checkpoint_on_resume_is_one_line(killed_checkpoints, fit, tmp_path):
    run, _, _ = killed_checkpoints  # its last/ is a complete epoch-2 checkpoint
    cases = {
        "state.json": b'{"state": {"epoch": 2',
        "optimizer.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{",
        "best.safetensors": b"",
    }
    for name, content in cases.items():
        copy = Path(shutil.copytree(run, tmp_path / name))
        (copy / keys.RUN_LAST / name).write_bytes(content)
        with pytest.raises(InputError) as err:
            fit(copy, epochs=3, resume=True)
        msg = str(err.value)
        assert msg.startswith(f"{copy / keys.RUN_LAST / name}: ") and "\n" not in msg, msg
    copy = Path(shutil.copytree(run, tmp_path / "incomplete"))
    (copy / keys.RUN_LAST / "best.safetensors").unlink()
    with pytest.raises(InputError, match="incomplete checkpoint: no best.safetensors"):
        fit(copy, epochs=3, resume=True)
    # a checkpoint of another network: one line, not a state-dict dump
    copy = Path(shutil.copytree(run, tmp_path / "other"))
    other = dict(model=dict(SMALL["model"], hidden=4))
    with pytest.raises(InputError, match="cannot resume from this checkpoint") as err:
        fit(copy, epochs=3, resume=True, config=other)
    assert "\n" not in str(err.value) and "size mismatch" in str(err.value)


def test_read_json_object(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"a": 1}')
    assert read_json_object(path) == {"a": 1}
