"""Where a model misses the ceiling: the part of each world's ceiling that its predictions do not
follow, split by what drives it.

The robustness benchmark reports a share of the ceiling; this script asks what the missing share
is made of. For every test slide and each of its cancer type's HVG-50 (from the training slides,
as ``evaluate`` picks them), the within-slide ceiling y (what the images can show) is compared
with the prediction p: ``explained`` is the share of y's variance that the best linear function
of p explains (PCC², the metric's own view: scale and offset are free), and the rest, the
residual r = y - (a p + b), is regressed on the slide's true visible drivers, which the cohort
files never hold (``histoprism.synthetic.cohort.true_drivers`` replays them):

- ``own``: the spot's own state (niche shares, nuclear density, texture);
- ``context``: its surroundings (neighbour niches times its own, the slide's immune share);
- ``linear``: all drivers together (a miss a linear read-out of the drivers would repair);
- ``rest``: what no linear function of the drivers explains (the nonlinear parts of the ceiling).

Shares are of y's variance, averaged over genes and slides. A miss that is linear in the drivers
is information the model did not extract from the embeddings; a large ``rest`` is nonlinearity.

    python benchmarks/ceiling_gap.py --worlds 4 5           # trains the default (~3 min a world)
    python benchmarks/ceiling_gap.py --worlds 4 --models histoprism mlp --keep /tmp/robustness

Prints a table and writes ``benchmarks/ceiling_gap.json``: records ``{world, model, slide,
cancer, explained, own, context, linear, rest, genes}`` and a summary per world and model.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from histoprism._core import keys
from histoprism.evaluation.evaluate import train_hvg
from histoprism.io.cohort import Cohort
from histoprism.models.registry import VARIANTS
from histoprism.synthetic.cohort import draw_world, true_drivers
from histoprism.synthetic.world import N_SPOT_DRIVERS, VIS_DRIVERS

try:  # run as a script from the repository root or benchmarks/
    from robustness import run_world
except ImportError:  # pragma: no cover
    from benchmarks.robustness import run_world

HERE = Path(__file__).parent
SLIDES = 20  # slides per world: the fit and the replay of its drivers must draw the same cohort
GROUPS = {
    "own": list(range(N_SPOT_DRIVERS)),
    "context": list(range(N_SPOT_DRIVERS, len(VIS_DRIVERS))),
    "linear": list(range(len(VIS_DRIVERS))),
}


def _explained(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Share of each column of y (N, G) that a least-squares fit on the columns of x (N, K) and
    an intercept explains: (G,)."""
    y, x = y - y.mean(0), x - x.mean(0)
    fit = x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return 1.0 - ((y - fit) ** 2).sum(0) / np.maximum((y * y).sum(0), 1e-12)


def slide_gap(
    pred: ad.AnnData, ceiling: ad.AnnData, drivers: pd.DataFrame, genes: list[str]
) -> dict:
    """One slide: shares of the ceiling's within-slide variance over ``genes`` (mean over genes)."""
    genes = [g for g in genes if g in pred.var_names and g in ceiling.var_names]
    spots = ceiling.obs_names
    y = np.asarray(ceiling[spots, genes].X, dtype=np.float64)
    p = np.asarray(pred[spots, genes].X, dtype=np.float64)
    keep = y.std(0) > 1e-6  # a gene the slide's ceiling holds flat has no shape to follow
    y, p = y[:, keep] - y[:, keep].mean(0), p[:, keep] - p[:, keep].mean(0)
    resid = y - p * ((p * y).sum(0) / np.maximum((p * p).sum(0), 1e-12))  # y - (a p + b)
    resid_share = (resid**2).sum(0) / np.maximum((y**2).sum(0), 1e-12)  # (G,) of y's variance
    d = drivers.loc[spots].to_numpy(np.float64)
    out = {"explained": float((1.0 - resid_share).mean()), "genes": int(keep.sum())}
    for name, cols in GROUPS.items():
        out[name] = float((_explained(resid, d[:, cols]) * resid_share).mean())
    out["rest"] = 1.0 - out["explained"] - out["linear"]
    return out


def world_gap(world: int, models: list[str], work: Path, *, config: str | None, seed: int) -> list:
    """Fit ``models`` on world ``world`` (robustness.run_world), then each test slide's gap."""
    options = {m: dict(VARIANTS[m].train_options(), seed=seed) for m in models}
    for kw in options.values():
        if config and kw["model"] == "histoprism":
            kw["config"] = config
    run_world(world, options, work, epochs=None, held_out=False, n_slides=SLIDES)
    cohort = Cohort(work / "cohort")
    test = cohort.ids("test")
    drivers = true_drivers(draw_world(world, n_slides=SLIDES), test)
    cancers = sorted({cohort.cancer(s) for s in test})
    hvg = train_hvg(cohort, cancers)
    records = []
    for model in models:
        for sid in test:
            genes = hvg.get(cohort.cancer(sid))
            if not genes:
                continue
            pred = ad.read_h5ad(work / "pred" / model / f"{sid}.h5ad")
            ceiling = ad.read_h5ad(work / "cohort" / keys.CEILING_DIR / f"{sid}.h5ad")
            gap = slide_gap(pred, ceiling, drivers[sid], genes)
            records.append(
                dict(world=world, model=model, slide=sid, cancer=cohort.cancer(sid), **gap)
            )
    return records


def summary(records: list[dict]) -> tuple[list[dict], str]:
    """Mean over slides per (world, model) and a markdown table of it."""
    rows = []
    for key in dict.fromkeys((r["world"], r["model"]) for r in records):
        rs = [r for r in records if (r["world"], r["model"]) == key]
        mean = {k: statistics.fmean(r[k] for r in rs) for k in ("explained", *GROUPS, "rest")}
        rows.append(dict(world=key[0], model=key[1], slides=len(rs), **mean))
    lines = [
        "| world | model | explained | missed: own | missed: context | missed: linear in drivers | missed: rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['model']} | {r['explained']:.1%} | {r['own']:.1%} | "
            f"{r['context']:.1%} | {r['linear']:.1%} | {r['rest']:.1%} |"
        )
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[4, 5])
    ap.add_argument("--models", nargs="+", default=["histoprism"], choices=list(VARIANTS))
    ap.add_argument("--config", default=None, help="recipe (preset or YAML) for histoprism models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="keep each world's files here")
    ap.add_argument("--out", type=Path, default=HERE / "ceiling_gap.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t0, records = time.perf_counter(), []
    for world in args.worlds:
        with tempfile.TemporaryDirectory(prefix=f"ceiling-gap-{world}-") as tmp:
            work = args.keep / f"world-{world}" if args.keep else Path(tmp)
            records += world_gap(world, args.models, work, config=args.config, seed=args.seed)
    rows, table = summary(records)
    print("\n" + table)
    minutes = (time.perf_counter() - t0) / 60
    meta = dict(minutes=round(minutes, 1), seed=args.seed, threads=args.threads, config=args.config)
    args.out.write_text(json.dumps(dict(meta=meta, summary=rows, records=records), indent=1) + "\n")


if __name__ == "__main__":
    main()
