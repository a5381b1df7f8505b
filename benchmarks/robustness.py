"""Robustness benchmark: every model on many drawn synthetic worlds, as a share of each world's ceiling.

A recipe tuned on one cohort can collapse on another. This script draws worlds whose biology and
measurement vary (``histoprism.synthetic.world.draw_world``: cancer-type effect and its visibility,
neighbourhood programmes, depth, stain, noise, embedding dimension and nonlinearity, spot counts,
targeted panels, number of cancer types), and runs the library's own ``train -> predict ->
evaluate`` for each model on each world's test split, plus the ceiling (what the images can show).

Worlds are split in two: the tuning worlds (``--worlds``) and held-out worlds (``--held-out``)
that no modelling choice was made on; each group gets its own median.

    python benchmarks/robustness.py                       # the full run (6 + 2 worlds, ~80 min)
    python benchmarks/robustness.py --worlds 0 1 --held-out --models histoprism mlp

Prints a table and writes ``benchmarks/robustness.json``: records ``{world, held_out, model, hvg,
gpc_hallmark, gpc_go, ceiling_hvg, ceiling_gpc_hallmark, ...}`` (macro over cancer types, test
slides, HVG-50 from the training slides) and the world's parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from histoprism.evaluation.evaluate import evaluate
from histoprism.inference.predict import predict
from histoprism.io.cohort import Cohort
from histoprism.models.registry import VARIANTS
from histoprism.synthetic.cohort import draw_world, make_cohort
from histoprism.training.api import train

HERE = Path(__file__).parent
TUNING_WORLDS = tuple(range(6))
HELD_OUT_WORLDS = (1001, 1002)  # never looked at while choosing the recipe
ENCODER = "synthetic"
# names of histoprism.models.registry.VARIANTS
MODELS = (
    "histoprism",
    "neighbour-mean",
    "neighbours-18",
    "local-attention-300",
    "no-conditioning",
    "mlp",
    "ridge-knn",
)
WORLD_KEYS = (
    "n_slides",
    "n_cancers",
    "spots",
    "embed_dim",
    "targeted_fraction",
    "cancer_effect",
    "cancer_tell",
    "context_strength",
    "slide_programme_sd",
    "depth_slide_sd",
    "stain_shift_sd",
    "stain_scale_sd",
    "spot_noise_sd",
    "embed_nonlinearity",
)


def run_world(
    seed: int,
    models: dict[str, dict],
    work: Path,
    *,
    epochs: int | None,
    held_out: bool,
    n_slides: int = 20,
    overrides: dict | None = None,
) -> list[dict]:
    """Draw world ``seed`` with ``n_slides`` slides (and its parameters ``overrides`` set), fit
    and score every model and the ceiling -> one record per model."""
    cfg = draw_world(seed, n_slides=n_slides)
    cfg = replace(cfg, **{k: type(getattr(cfg, k))(v) for k, v in (overrides or {}).items()})
    data = work / "cohort"
    if not (data / "README.txt").exists():  # the last file make_cohort writes
        make_cohort(data, config=cfg)
    cohort = Cohort(data)
    world = {k: v for k, v in asdict(cfg).items() if k in WORLD_KEYS}
    ceiling_json = work / "eval-ceiling" / "metrics.json"
    if ceiling_json.exists():
        ceiling = json.loads(ceiling_json.read_text())["headline"]
    else:
        ceiling = evaluate(data / "ceiling", cohort, ceiling_json.parent, progress=False)
        ceiling = ceiling["headline"]
    records = []
    for label, kwargs in models.items():
        t0 = time.perf_counter()
        shutil.rmtree(work / "runs" / label, ignore_errors=True)  # a fresh fit, never a resume
        run = train(data, ENCODER, work / "runs" / label, epochs=epochs, progress=False, **kwargs)
        fit_s = time.perf_counter() - t0
        predict(run, data, ENCODER, work / "pred" / label, progress=False)
        head = evaluate(work / "pred" / label, cohort, work / "eval" / label, progress=False)
        head = head["headline"]
        records.append(
            dict(
                world=seed,
                held_out=held_out,
                model=label,
                seed=kwargs.get("seed", 0),
                hvg=head["hvg_macro"],
                gpc_hallmark=head["gpc_hallmark_macro"],
                gpc_go=head["gpc_go_macro"],
                ceiling_hvg=ceiling["hvg_macro"],
                ceiling_gpc_hallmark=ceiling["gpc_hallmark_macro"],
                ceiling_gpc_go=ceiling["gpc_go_macro"],
                train_s=round(fit_s, 1),
                params=world,
            )
        )
        print(_line(records[-1]), flush=True)
    return records


def _override(item: str) -> tuple[str, float]:
    """'spot_noise_sd=0.1' -> ('spot_noise_sd', 0.1): a numeric world parameter."""
    key, sep, value = item.partition("=")
    if not sep or key not in WORLD_KEYS or key == "spots":
        raise SystemExit(f"--set wants KEY=VALUE with KEY among {', '.join(WORLD_KEYS)}: {item!r}")
    return key, float(value)


def _share(r: dict, key: str) -> float:
    return r[key] / r[f"ceiling_{key}"]


def _line(r: dict) -> str:
    return (
        f"world {r['world']:>5}{'*' if r['held_out'] else ' '} {r['model']:<18} "
        f"HVG-50 {r['hvg']:.3f} ({_share(r, 'hvg'):6.1%})  "
        f"GPC Hallmark {r['gpc_hallmark']:.3f} ({_share(r, 'gpc_hallmark'):6.1%})  "
        f"{r['train_s']:6.1f} s"
    )


def seed_means(records: list[dict]) -> list[dict]:
    """One record per (world, model): scores averaged over its training seeds (``n_seeds``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["world"], r["model"]), []).append(r)
    out = []
    for rs in groups.values():
        mean = {k: statistics.fmean(r[k] for r in rs) for k in ("hvg", "gpc_hallmark", "gpc_go")}
        out.append({**rs[0], **mean, "n_seeds": len(rs)})
    return out


def summary(records: list[dict]) -> str:
    """Markdown table: per world and model the share of the ceiling (the mean over seeds where a
    model was trained with several); medians per world group."""
    records = seed_means(records)
    models = list(dict.fromkeys(r["model"] for r in records))
    worlds = list(dict.fromkeys((r["world"], r["held_out"]) for r in records))
    by = {(r["world"], r["model"]): r for r in records}
    head = "| world | " + " | ".join(f"{m} HVG-50 / GPC-H" for m in models) + " |"
    lines = [head, "|---" * (len(models) + 1) + "|"]
    for w, held in worlds:
        cells = []
        for m in models:
            r = by.get((w, m))
            cells.append(
                "—"
                if r is None
                else f"{r['hvg']:.3f} / {r['gpc_hallmark']:.3f} "
                f"({_share(r, 'hvg'):.0%} / {_share(r, 'gpc_hallmark'):.0%})"
            )
        lines.append(f"| {w}{' (held out)' if held else ''} | " + " | ".join(cells) + " |")
    for held, name in ((False, "median, tuning worlds"), (True, "median, held-out worlds")):
        cells = []
        for m in models:
            rs = [r for r in records if r["model"] == m and r["held_out"] == held]
            if not rs:
                cells.append("—")
                continue
            hv = statistics.median(_share(r, "hvg") for r in rs)
            gp = statistics.median(_share(r, "gpc_hallmark") for r in rs)
            cells.append(f"{hv:.1%} / {gp:.1%} of ceiling")
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="*", default=list(TUNING_WORLDS))
    ap.add_argument("--held-out", type=int, nargs="*", default=list(HELD_OUT_WORLDS))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(VARIANTS))
    ap.add_argument("--config", default=None, help="recipe (preset or YAML) for histoprism models")
    ap.add_argument("--epochs", type=int, default=None, help="cap epochs (default: the recipe's)")
    ap.add_argument("--out", type=Path, default=HERE / "robustness.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed of every model")
    ap.add_argument(
        "--slides", type=int, default=20, help="slides per world (the same biology, more data)"
    )
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep each world's cohort here and reuse it"
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="fix a drawn parameter in every world, e.g. spot_noise_sd=0.1",
    )
    args = ap.parse_args(argv)
    overrides = dict(_override(kv) for kv in args.set)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    models = {m: dict(VARIANTS[m].train_options(), seed=args.seed) for m in args.models}
    if args.config:
        for kw in models.values():
            if kw["model"] == "histoprism":
                kw["config"] = args.config
    t0, records = time.perf_counter(), []
    plan = [(w, False) for w in args.worlds] + [(w, True) for w in args.held_out]
    for seed, held in plan:
        with tempfile.TemporaryDirectory(prefix=f"robustness-{seed}-") as tmp:
            work = args.keep / f"world-{seed}" if args.keep else Path(tmp)
            records += run_world(
                seed,
                models,
                work,
                epochs=args.epochs,
                held_out=held,
                n_slides=args.slides,
                overrides=overrides,
            )
    table = summary(records)
    print("\n" + table)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{len(plan)} worlds, {len(models)} models, {minutes:.1f} min")
    meta = dict(
        minutes=round(minutes, 1),
        seed=args.seed,
        threads=args.threads,
        config=args.config,
        slides=args.slides,
        set=overrides,
    )
    args.out.write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")


if __name__ == "__main__":
    main()
