"""The verbs where one CLI command is not one function below: same names and parameters as the
command line, for the facade (``hp.evaluate``, ``hp.benchmark``) and the CLI alike."""

from __future__ import annotations

from pathlib import Path


def evaluate(
    pred: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | Path | None = None,
    hvg: str = "train",
    genesets: list[str] | None = None,
    samples: str | list[str] | None = None,
) -> dict:
    """``histoprism evaluate``: score ``pred`` (PRED folder) against the cohort ``data``; write the
    EVAL folder ``out`` (docs/formats.md). ``samples`` instead of the test split: ``all`` (every
    slide with a prediction), a split name, or ids (a list or comma-separated), the rule of
    ``predict --samples`` (``Cohort.select``). Returns metrics.json as a dict."""
    from .evaluation.evaluate import evaluate as evaluate_cohort
    from .io.cohort import Cohort
    from .io.prediction import predicted_ids

    cohort = Cohort(data, split_dir=split)
    ids = samples
    if isinstance(samples, str):
        ids = cohort.select(samples, among=predicted_ids(pred))
    return evaluate_cohort(pred, cohort, out, hvg=hvg, genesets=genesets, samples=ids)


PROTOCOLS = ("split", "paper", "loco")


def benchmark(
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    protocol: str = "split",
    split: str | Path | None = None,
    models: str | list[str] | None = None,
    hvg: str = "train",
    epochs: int | None = None,
    seed: int = 0,
) -> dict:
    """``histoprism benchmark``: every model of ``models`` (default: all) trained, predicted and
    evaluated under ``protocol`` ('split': one split; 'paper': the paper's two splits with the
    HEST-bench HVG lists; 'loco': leave each cancer type out). Returns the written paths by kind
    ('md', ...); 'loco' adds its table under 'table'."""
    from .workflows import benchmark as bench

    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else models
    if protocol == "paper":
        return bench.benchmark_paper(data, encoder, out, models=names, epochs=epochs, seed=seed)
    if protocol == "split":
        return bench.benchmark(
            data, encoder, out, models=names, split=split, hvg=hvg, epochs=epochs, seed=seed
        )
    if protocol == "loco":
        from .workflows.loco import loco

        table = loco(data, encoder, out, split=split, epochs=epochs, seed=seed)
        return {"md": Path(out) / "loco.md", "table": table}
    from ._core.errors import InputError

    raise InputError(f"unknown protocol '{protocol}' ({' | '.join(PROTOCOLS)})")


def list_models() -> list[str]:
    """Names ``train --model`` and ``benchmark --models`` accept."""
    from .models.registry import VARIANTS

    return list(VARIANTS)


def list_encoders() -> list[str]:
    """Names ``extract --encoder`` accepts (foundation models and the offline encoders)."""
    from .images.encoders import encoder_names

    return encoder_names()
