"""``histoprism benchmark``: every model on the same split -> one comparison with significance.

Each model is trained and predicted in its own process (``histoprism train`` / ``predict``), so
that its wall time and peak memory are measured alone (``os.wait4`` gives the child's rusage).
Finished models are reused when the benchmark is run again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from .._core import keys
from .._core.errors import InputError
from .._core.files import write_text_atomic
from .._core.progress import progress_bar
from ..evaluation.compare import (
    EvalResult,
    comparison_table,
    load_eval,
    pairwise_tests,
    per_cancer_table,
    pipe_table,
    write_comparison,
)
from ..evaluation.evaluate import evaluate
from ..expression.genes import data_path
from ..io.cohort import Cohort
from ..models.registry import Variant, select_variants
from ..plotting.report import write_benchmark_report

log = logging.getLogger(__name__)
TIMING = keys.BENCH_TIMING


def measure_process(cmd: list[str], *, timeout: float | None = None) -> dict:
    """Run ``cmd`` in a child process, measured alone.

    Returns {"returncode", "stdout", "stderr" (text), "seconds" (wall, start to exit),
    "peak_rss_mb" (the child's own ru_maxrss from ``os.wait4``; Linux reports kB), "timed_out"}.
    Output goes to temporary files, not pipes, so a chatty child cannot stall on a full pipe.
    With ``timeout`` (seconds), a child still running then is killed and ``timed_out`` is True.
    """
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err,
    ):
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        timed_out = False
        if timeout is None:
            _, status, usage = os.wait4(proc.pid, 0)
        else:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    _, status, usage = os.wait4(proc.pid, 0)
                    timed_out = True
                    break
                time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        return {
            "returncode": proc.returncode,
            "stdout": out.read(),
            "stderr": err.read(),
            "seconds": seconds,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "timed_out": timed_out,
        }


def run_measured(args: list[str]) -> dict:
    """Run ``histoprism ARGS`` in a child process -> {seconds, peak_rss_mb}; InputError on failure."""
    m = measure_process([sys.executable, "-m", "histoprism.cli", *args])
    if m["returncode"] != 0:
        lines = [ln.strip(" │╭╮╰╯─") for ln in (m["stderr"] or m["stdout"]).splitlines()]
        reason = next((ln for ln in reversed(lines) if ln), "no output")
        raise InputError(f"'histoprism {args[0]}' failed: {reason}")
    return {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"]}


def _fit_and_predict(
    model: Variant, data: Path, encoder: str, out: Path, train_flags: list[str], split: list[str]
) -> dict:
    """Train and predict one model in child processes; return its timing."""
    run, pred = out / "runs" / model.name, out / "pred" / model.name
    flags = model.cli_flags()
    if model.config:
        cfg = out / "configs" / f"{model.name}.yaml"
        write_text_atomic(cfg, yaml.safe_dump(model.config))
        flags += ["--config", str(cfg)]
    base = ["--data", str(data), "--encoder", encoder, *split]
    fit = run_measured(["train", *base, "--out", str(run), *train_flags, *flags])
    pr = run_measured(["predict", "--model", str(run), *base, "--out", str(pred)])
    return {
        "train_s": fit["seconds"],
        "predict_s": pr["seconds"],
        "peak_rss_mb": max(fit["peak_rss_mb"], pr["peak_rss_mb"]),
    }


def benchmark(
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    models: list[str] | None = None,
    split: str | Path | None = None,
    hvg: str = "train",
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Train, predict and evaluate every model on one split; write the comparison to ``out``.

    Returns the paths written by ``compare.write_comparison`` (comparison.md/.csv/.json) plus
    ``report``. Models whose evaluation and timing already exist in ``out`` are not rerun.
    """
    data, out = Path(data), Path(out)
    cohort = Cohort(data, split_dir=split)  # the split every command draws (seed is the models')
    chosen = select_variants(models)
    timing = _read_timing(out)
    split_flags = ["--split", str(split)] if split else []
    train_flags = ["--seed", str(seed), *([] if epochs is None else ["--epochs", str(epochs)])]
    results: list[EvalResult] = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("benchmark", total=len(chosen), info="")
        for m in chosen:
            bar.update(task, info=m.name)
            ev = out / "eval" / m.name
            if m.name not in timing or not (ev / keys.EVAL_METRICS).exists():
                timing[m.name] = _fit_and_predict(m, data, encoder, out, train_flags, split_flags)
                evaluate(out / "pred" / m.name, cohort, ev, hvg=hvg, progress=False)
                write_text_atomic(out / TIMING, json.dumps(timing, indent=1))
            results.append(load_eval(m.name, ev))
            bar.advance(task)
    return _write_all(out, results, timing)


def _write_all(out: Path, results: list[EvalResult], timing: dict) -> dict[str, Path]:
    names = {r.name for r in results}
    timing = {k: v for k, v in timing.items() if k in names}
    paths = write_comparison(out, results, timing=timing, reference=results[0].name)
    tests = pairwise_tests(results, reference=results[0].name) if len(results) > 1 else None
    paths["report"] = write_benchmark_report(
        out,
        table=comparison_table(results, timing),
        per_cancer=per_cancer_table(results),
        per_pathway={r.name: r.per_pathway for r in results},
        tests=tests,
        reference=results[0].name,
    )
    return paths


def _read_timing(out: Path) -> dict:
    path = out / TIMING
    return json.loads(path.read_text()) if path.exists() else {}


def paper_splits() -> list[Path]:
    """The paper's two bundled splits (split_0, split_1)."""
    return [data_path("splits", f"split_{k}") for k in (0, 1)]


def benchmark_paper(
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    models: list[str] | None = None,
    splits: list[Path] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """The paper's protocol: one benchmark per split (HEST-bench HVG lists), then Table 1 numbers.

    Per model and cancer type: macro = mean over splits of the split's mean over that type's
    test slides; micro = mean over the pooled test slides of all splits. Writes
    ``out/paper_table.{csv,md}`` beside one benchmark folder per split.
    """
    out = Path(out)
    splits = splits or paper_splits()
    per_split = []
    for k, split_dir in enumerate(splits):
        folder = out / f"split_{k}"
        benchmark(data, encoder, folder, models=models, split=split_dir, hvg="bench",
                  epochs=epochs, seed=seed, progress=progress)  # fmt: skip
        per_split.append(
            [load_eval(m.name, folder / "eval" / m.name) for m in select_variants(models)]
        )
    table = paper_table(per_split)
    table.to_csv(out / "paper_table.csv")
    write_text_atomic(out / "paper_table.md", pipe_table(table))
    return {"csv": out / "paper_table.csv", "md": out / "paper_table.md"}


def paper_table(per_split: list[list[EvalResult]]) -> pd.DataFrame:
    """Rows: model x (cancer type | 'all'); columns: HVG-50 and GPC macro (over splits) and micro."""
    frames = []
    for k, results in enumerate(per_split):
        for r in results:
            frames.append(r.per_slide.assign(model=r.name, split=k))
    slides = pd.concat(frames, ignore_index=True)
    scores = [c for c in ("hvg", "gpc_hallmark", "gpc_go", "all_genes") if c in slides.columns]
    by_split = slides.groupby(["model", "oncotree_code", "split"])[scores].mean()
    macro = by_split.groupby(["model", "oncotree_code"]).mean().add_suffix("_macro")
    micro = slides.groupby(["model", "oncotree_code"])[scores].mean().add_suffix("_micro")
    table = macro.join(micro)
    overall_macro = macro.groupby("model").mean()
    overall_micro = slides.groupby("model")[scores].mean().add_suffix("_micro")
    overall = overall_macro.join(overall_micro).assign(oncotree_code="all")
    overall = overall.set_index("oncotree_code", append=True)
    return pd.concat([table, overall]).sort_index()
