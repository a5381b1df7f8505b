"""The command line (docs/cli.md): flags in --help, train -> predict -> evaluate, and
bad input as exit code != 0 with one line on stderr (the exception itself with --debug)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism._core.files import LOCK_FILE
from histoprism.cli import app, hoist_global_flags
from histoprism.io.cohort import Cohort

ENCODER = "synthetic"
CONSOLE_SCRIPT = Path(sys.executable).parent / "histoprism"

FLAGS = {
    "train": "--data --encoder --out --split --model --epochs --no-conditioning "
    "--positional-encoding --genes --seed --config --attention --attention-radius-um --crop-spots "
    "--init --prompt",
    "predict": "--model --data --encoder --out --split --samples --attention --attention-radius-um "
    "--prompt-fraction --prompt-seed",
    "evaluate": "--pred --data --out --split --hvg --genesets",
    "extract": "--data --encoder --weights --allow-download --samples --source --mpp --batch-size "
    "--device --overwrite",
    "demo": "--out --from-images",
}


def invoke(*args):
    # a wide terminal, so that help tables never shorten option names
    return CliRunner(env={"COLUMNS": "160"}).invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", FLAGS)
def test_help_lists_design_flags(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    words = set(result.stdout.replace("│", " ").split())
    missing = [f for f in FLAGS[command].split() if f not in words]
    assert not missing, f"{command} --help lacks {missing}"
    assert "Usage:" in result.stdout and len(result.stdout.splitlines()) > 10


@pytest.mark.parametrize("command", ["train", "predict", "extract"])
def test_flags_show_no_value_placeholder(command):
    """A flag takes no value: its help line names no type beside it."""
    lines = invoke(command, "--help").stdout.splitlines()
    flag_lines = [
        ln
        for ln in lines
        if "--float16" in ln or "--resume" in ln or "--overwrite" in ln or "--help" in ln
    ]
    assert len(flag_lines) >= 2 and not any("<bool>" in ln for ln in flag_lines)
    assert "<bool>" not in invoke("--help").stdout  # the group's own --help too


def test_debug_and_verbose_accepted_after_the_subcommand(tmp_path):
    args = ["predict", "--model", "RUN", "--debug", "-v", "--out", "PRED"]
    assert hoist_global_flags(args) == [
        "--debug",
        "-v",
        "predict",
        "--model",
        "RUN",
        "--out",
        "PRED",
    ]
    # hoisted, the callback turns --debug on: a bad run directory raises instead of one line
    result = invoke(
        *hoist_global_flags(
            [
                "predict",
                "--model",
                tmp_path / "none",
                "--data",
                tmp_path,
                "--encoder",
                ENCODER,
                "--out",
                tmp_path / "p",
                "--debug",
            ]
        )
    )
    assert result.exit_code != 0 and result.exception is not None
    assert not isinstance(result.exception, SystemExit)


def test_top_level_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in FLAGS:
        assert command in result.stdout


# --- train -> predict -> evaluate ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tiny_cohort, tmp_path_factory):
    """Run the three commands once; returns their results and output folders."""
    root = tmp_path_factory.mktemp("cli")
    run, pred, ev = root / "run", root / "pred", root / "eval"
    results = {
        "train": invoke(
            "train", "--data", tiny_cohort, "--encoder", ENCODER, "--out", run, "--epochs", 2
        ),
        "predict": invoke(
            "predict", "--model", run, "--data", tiny_cohort, "--encoder", ENCODER, "--out", pred
        ),
        "evaluate": invoke("evaluate", "--pred", pred, "--data", tiny_cohort, "--out", ev),
    }
    return results, run, pred, ev


@pytest.mark.parametrize(
    "command, start",
    [("train", "trained histoprism on 4 slides, 300 genes"), ("predict", "predicted 2 slides")],
)
def test_pipeline_commands_succeed_with_one_line_summary(pipeline, command, start):
    result = pipeline[0][command]
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), result.stdout


def test_pipeline_writes_every_output(pipeline, tiny_cohort):
    results, run, pred, ev = pipeline
    assert results["evaluate"].exit_code == 0, results["evaluate"].stderr
    lines = results["evaluate"].stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("2 slides: HVG-50 ")
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "config.json", "history.csv"}
    assert len((run / keys.RUN_HISTORY).read_text().splitlines()) == 1 + 2  # header + 2 epochs
    test_ids = Cohort(tiny_cohort).ids("test")
    written = sorted(p.name for p in pred.iterdir() if p.name != LOCK_FILE)
    assert written == sorted(f"{i}.h5ad" for i in test_ids)
    names = {p.name for p in ev.iterdir()}
    assert names >= {"metrics.json", "per_slide.csv", "per_gene.csv", "per_pathway.csv"}
    assert "report.html" in names


def test_evaluate_with_no_gene_in_common_says_na_without_a_traceback(
    pipeline, tiny_cohort, tmp_path
):
    """Predictions named in another gene vocabulary score nothing: the metrics are null and the
    summary says n/a instead of failing on the format."""
    _, _, pred, _ = pipeline
    renamed = tmp_path / "pred"
    renamed.mkdir()
    for path in pred.glob("*.h5ad"):
        adata = ad.read_h5ad(path)
        adata.var_names = [f"NOT_A_GENE_{i}" for i in range(adata.n_vars)]
        adata.write_h5ad(renamed / path.name)
    result = invoke("evaluate", "--pred", renamed, "--data", tiny_cohort, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.stderr
    assert "HVG-50 n/a (macro n/a)" in result.stdout and "all genes n/a" in result.stdout


def test_evaluate_with_only_a_custom_gmt_summarises_it(pipeline, tiny_cohort, tmp_path):
    _, _, pred, _ = pipeline
    genes = list(ad.read_h5ad(next(pred.glob("*.h5ad"))).var_names[:20])
    gmt = tmp_path / "mine.gmt"
    gmt.write_text("MY_SET\tmine\t" + "\t".join(genes) + "\n")
    result = invoke(
        "evaluate", "--pred", pred, "--data", tiny_cohort, "--out", tmp_path / "ev",
        "--genesets", gmt,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "GPC mine " in result.stdout and "Hallmark" not in result.stdout


# --- bad input: one line on stderr, no traceback; --debug raises ---------------------------------------
def _first_train_id(root: Path) -> str:
    return Cohort(root).ids("train")[0]


def _case(name, cc, runs, pipeline_pred, tmp):
    """(args, words the error line must contain) for one kind of bad input."""
    train = ["train", "--encoder", ENCODER, "--out", tmp / "run", "--model", "ridge"]
    train += ["--data", cc.root]
    sid = _first_train_id(cc.root)
    test_id = Cohort(cc.root).ids("test")[0]
    predict = ["predict", "--model", runs["histoprism"], "--data", cc.root]
    predict += ["--encoder", ENCODER, "--out", tmp / "pred", "--samples", test_id]
    if name == "missing cohort dir":
        return ["train", "--data", tmp / "nope", "--encoder", ENCODER, "--out", tmp / "r"], [
            "nope",
            "not found",
        ]
    if name == "missing embedding file":
        cc.emb_path(sid).unlink()
        return train, [f"{sid}.h5", "not found"]
    if name == "NaN embeddings":
        cc.edit_embedding(sid, lambda f: np.where(np.arange(len(f))[:, None] == 3, np.nan, f))
        return train, [f"{sid}.h5", "NaN"]
    if name == "duplicate barcodes":
        cc.edit_st(sid, _rename_obs)
        return train, [f"{sid}.h5ad", "duplicate barcode"]
    if name == "duplicate genes":
        cc.edit_st(sid, _rename_var)
        return train, [f"{sid}.h5ad", "duplicate gene"]
    if name == "empty slide":
        cc.edit_st(sid, lambda a: a[:0].copy())
        return train, [f"{sid}.h5ad", "no spots"]
    if name == "empty embedding file":
        cc.edit_embedding(sid, lambda f: f[:0])
        return train, [f"{sid}.h5", "(0, 32)"]
    if name == "embedding dim differs from model":
        cc.edit_embedding(test_id, lambda f: f[:, :16])
        return predict, [test_id, "dimension", "16", "32"]
    if name == "unknown cancer at predict":
        cc.set_cancer(test_id, "MESO")
        return predict, ["MESO", "--unknown-cancer"]
    if name == "missing prediction file":
        pred = tmp / "partial_pred"
        pred.mkdir()
        only = sorted(pipeline_pred.glob("*.h5ad"))[0]
        (pred / only.name).write_bytes(only.read_bytes())
        missing = next(i for i in Cohort(cc.root).ids("test") if i != only.stem)
        return ["evaluate", "--pred", pred, "--data", cc.root, "--out", tmp / "ev"], [
            f"{missing}.h5ad",
            "not found",
        ]
    if name == "missing split dir":
        return train + ["--split", tmp / "nosplit"], ["nosplit", "not found"]
    if name == "unknown model":
        return ["train", "--data", cc.root, "--encoder", ENCODER, "--out", tmp / "r"] + [
            "--model",
            "foo",
        ], ["foo", "histoprism"]
    raise AssertionError(name)


def _rename_obs(a: ad.AnnData) -> ad.AnnData:
    names = list(a.obs_names)
    names[1] = names[0]
    a.obs_names = names
    return a


def _rename_var(a: ad.AnnData) -> ad.AnnData:
    names = list(a.var_names)
    names[1] = names[0]
    a.var_names = names
    return a


BAD_INPUTS = [
    "missing cohort dir",
    "missing embedding file",
    "NaN embeddings",
    "duplicate barcodes",
    "duplicate genes",
    "empty slide",
    "empty embedding file",
    "embedding dim differs from model",
    "unknown cancer at predict",
    "missing prediction file",
    "unknown model",
    "missing split dir",
]


@pytest.mark.filterwarnings("ignore:.*not unique")
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_one_line_on_stderr(name, cohort_copy, trained_runs, pipeline, tmp_path):
    args, words = _case(name, cohort_copy(), trained_runs, pipeline[2], tmp_path)
    result = invoke(*args)
    assert result.exit_code not in (0, 1), (result.exit_code, result.exception)
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    debug = invoke("--debug", *args)
    assert isinstance(debug.exception, InputError), debug.exception
    assert debug.exit_code != 0


@pytest.mark.parametrize("name", ["missing cohort dir", "unknown cancer at predict"])
def test_bad_input_through_console_script(name, cohort_copy, trained_runs, pipeline, tmp_path):
    """The installed ``histoprism`` executable: real stderr, real logging set-up."""
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT}")
    args, words = _case(name, cohort_copy(), trained_runs, pipeline[2], tmp_path)
    env = {**os.environ, "HISTOPRISM_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode not in (0, 1)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


# --- no half-written outputs -------------------------------------------------------------------------
def test_failed_predict_leaves_only_complete_files(cohort_copy, trained_runs, tmp_path):
    cc = cohort_copy()
    first, second = Cohort(cc.root).ids("test")
    cc.edit_embedding(second, lambda f: np.where(np.arange(len(f))[:, None] == 0, np.nan, f))
    out = tmp_path / "pred"
    result = invoke(
        "predict", "--model", trained_runs["histoprism"], "--data", cc.root, "--encoder", ENCODER,
        "--out", out, "--samples", f"{first},{second}",
    )  # fmt: skip
    assert result.exit_code == 2 and f"{second}.h5" in result.stderr
    files = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    assert files == [f"{first}.h5ad"]  # no temporary or partial file, no file for the failure
    pred = ad.read_h5ad(out / files[0])
    assert pred.X.shape == (ad.read_h5ad(cc.st_path(first)).n_obs, 300)
    assert np.isfinite(pred.X).all()


def test_attention_flags_reach_the_run(tiny_cohort, tmp_path):
    import json

    result = invoke(
        "train", "--data", tiny_cohort, "--encoder", ENCODER, "--out", tmp_path / "run",
        "--epochs", 1, "--attention", "local", "--attention-radius-um", 300, "--crop-spots", 100,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / keys.RUN_CONFIG).read_text())
    assert cfg["model_config"]["attention"] == "local"
    assert cfg["model_config"]["attention_radius_um"] == 300
    assert cfg["train_config"]["crop_spots"] == 100
    result = invoke("train", "--data", tiny_cohort, "--encoder", ENCODER, "--out", tmp_path / "r2",
                    "--attention", "sideways")  # fmt: skip
    assert result.exit_code == 2 and "sideways" in result.output


def test_a_failed_predict_leaves_no_lock_and_no_folder(cohort_copy, trained_runs, tmp_path):
    """The slide fails inside the locked output folder: the folder it made goes with the lock;
    a folder that was there before stays, without the lock."""
    cohort = cohort_copy()
    sid = Cohort(cohort.root).ids("test")[0]
    cohort.emb_path(sid).unlink()
    args = ["--model", trained_runs["histoprism"], "--data", cohort.root, "--encoder", ENCODER]
    out = tmp_path / "new" / "pred"
    result = invoke("predict", *args, "--out", out, "--samples", sid)
    assert result.exit_code == 2 and sid in result.output
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert invoke("predict", *args, "--out", kept, "--samples", sid).exit_code == 2
    assert kept.is_dir() and list(kept.iterdir()) == []
