"""Small panels: adapting a pretrained HistoPrism (``train --init``) against training from scratch.

One built-in world (``histoprism.synthetic.world``). HistoPrism is pretrained once on the full panel
minus 10 genes, on slides disjoint from everything below. A 50-gene panel (40 of the pretrained
panel, the 10 left out) is then fitted on 1, 2, 4 and 8 other training slides (2 validation
slides throughout) by: the pretrained run adapted (closed-form head; also with the prior on the pretrained rows
left out of its grid), HistoPrism trained from
scratch on the panel (default recipe, few epochs) and the HEST-bench ridge on the embeddings.
Scored on 6 held-out test slides: mean per-gene Pearson r over (slide, gene) pairs, all 50 genes
and the 10 new ones; wall time of each fit.

    python benchmarks/adapt.py            # prints the table, writes benchmarks/adapt.json
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histoprism.expression.correlation import pearson_per_gene
from histoprism.io.cohort import Cohort
from histoprism.io.rundir import load_run
from histoprism.models.inputs import slide_targets
from histoprism.models.run import load
from histoprism.synthetic.cohort import SyntheticConfig, make_cohort
from histoprism.training.adapt import adapt
from histoprism.training.api import train
from histoprism.training.data import load_training_data

ENCODER = "synthetic"
WORLD = SyntheticConfig(
    n_slides=28,
    n_cancers=2,
    spots=(200, 400),
    n_genes=400,
    embed_dim=128,
    targeted_fraction=0.0,
    seed=3,
)
N_PRETRAIN, N_PRE_VAL, N_VAL, N_TEST = 10, 2, 2, 6
TRAIN_SIZES = (1, 2, 4, 8)
PANEL, NEW = 50, 10  # panel size; genes of it left out of the pretraining panel
PRETRAIN_EPOCHS, SCRATCH_EPOCHS = 20, 20
SEED = 0
OUT = Path(__file__).with_name("adapt.json")


def write_split(root: Path, train_ids, val_ids, test_ids) -> Path:
    """A split directory (train/val/test_split.csv) for ``Cohort(split_dir=...)``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
        pd.DataFrame({"sample_id": list(ids)}).to_csv(root / f"{name}_split.csv", index=False)
    return root


def write_genes(path: Path, genes) -> Path:
    path.write_text("\n".join(genes) + "\n")
    return path


def score(run: Path, cohort: Cohort, test_ids, panel: list[str], new: set[str]) -> dict:
    """Mean per-gene Pearson r over every (test slide, panel gene) pair, all genes and new ones."""
    r_all, r_new = [], []
    model = load(run, device="cpu")
    for sid in test_ids:
        slide = cohort.slide(sid, ENCODER)
        pred = model.predictor.predict_genes(model.predictor.prepare(slide), slice(None))
        y, cols = slide_targets(slide, model.panel)  # (N, G_m) measured log1p, panel columns
        r = pearson_per_gene(pred[:, cols], y)
        is_new = np.array([panel[c] in new for c in cols])
        r_all.append(r)
        r_new.append(r[is_new])
    a, n = np.concatenate(r_all), np.concatenate(r_new)
    return dict(pearson=float(np.nanmean(a)), pearson_new=float(np.nanmean(n)))


def main() -> None:
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_cohort(tmp / "cohort", config=WORLD)
        cohort = Cohort(root)
        ids = np.random.default_rng(SEED).permutation(cohort.ids())
        test = ids[:N_TEST]
        pre_train = ids[N_TEST : N_TEST + N_PRETRAIN]
        pre_val = ids[N_TEST + N_PRETRAIN : N_TEST + N_PRETRAIN + N_PRE_VAL]
        rest = ids[N_TEST + N_PRETRAIN + N_PRE_VAL :]
        val, pool = rest[:N_VAL], rest[N_VAL:]
        assert len(pool) >= max(TRAIN_SIZES), len(pool)

        # the panel: 50 of the 200 most expressed genes of the pool's slides, 10 of them unseen
        # in pretraining (a targeted panel picks genes it can measure)
        slides = [cohort.slide(s, ENCODER) for s in pool]
        genes = sorted(set.intersection(*(set(s.genes) for s in slides)))
        means = np.mean([s.log1p_counts()[:, [list(s.genes).index(g) for g in genes]].mean(0)
                         for s in slides], axis=0)  # fmt: skip
        top = [genes[i] for i in np.argsort(-means)[:200]]
        rng = np.random.default_rng(SEED + 1)
        panel = sorted(rng.choice(top, PANEL, replace=False).tolist())
        new = set(rng.choice(panel, NEW, replace=False).tolist())
        every = sorted(set().union(*(set(cohort.slide(s, ENCODER).genes) for s in pre_train)))
        pre_genes = write_genes(tmp / "pre_genes.txt", [g for g in every if g not in new])
        panel_file = write_genes(tmp / "panel.txt", panel)

        t0 = time.perf_counter()
        pre = train(
            root, ENCODER, tmp / "pre", split=write_split(tmp / "split_pre", pre_train, pre_val, test),
            genes=pre_genes, epochs=PRETRAIN_EPOCHS, seed=SEED,
        )  # fmt: skip
        pretrain_s = time.perf_counter() - t0
        print(f"pretrained on {len(pre_train)} slides, {len(every) - NEW} genes [{pretrain_s:.0f}s]",
              file=sys.stderr)  # fmt: skip

        rows = []
        for n in TRAIN_SIZES:
            split = write_split(tmp / f"split_{n}", pool[:n], val, test)
            fits = {
                "adapted (train --init)": dict(init=pre),
                "HistoPrism from scratch": dict(epochs=SCRATCH_EPOCHS),
                "ridge (HEST-bench)": dict(model="ridge"),
            }
            for name, opts in fits.items():
                t0 = time.perf_counter()
                run = train(
                    root, ENCODER, tmp / f"{name.split()[0]}_{n}", split=split, genes=panel_file,
                    seed=SEED, progress=False, **opts,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                chosen = load_run(run)[0].get("adapt", {})
                rows.append(dict(model=name, train_slides=n, seconds=seconds,
                                 prior=chosen.get("prior"), alpha=chosen.get("alpha"),
                                 **score(run, cohort, test, panel, new)))  # fmt: skip
            # the same adaptation with the head shrunk towards zero only: what the pretrained
            # rows add as a prior
            t0 = time.perf_counter()
            data = load_training_data(Cohort(root, split_dir=split), ENCODER, genes=panel_file)
            run = adapt(pre, data, tmp / f"zero_{n}", priors=("zero",), progress=False)
            rows.append(dict(model="adapted, zero prior only", train_slides=n,
                             seconds=time.perf_counter() - t0, prior="zero",
                             alpha=load_run(run)[0]["adapt"]["alpha"],
                             **score(run, cohort, test, panel, new)))  # fmt: skip
            for row in rows[-len(fits) - 1 :]:
                print(f"{n} slides  {row['model']:26s} r {row['pearson']:.3f}  new "
                      f"{row['pearson_new']:.3f}  [{row['seconds']:.1f}s]", file=sys.stderr)  # fmt: skip

    table = pd.DataFrame(rows)
    lines = ["| model | " + " | ".join(f"{n} slide{'s' * (n > 1)}" for n in TRAIN_SIZES) + " |",
             "|---|" + "---|" * len(TRAIN_SIZES)]  # fmt: skip
    for name, g in table.groupby("model", sort=False):
        cells = [
            f"{r.pearson:.3f} / {r.pearson_new:.3f} ({r.seconds:.0f} s)" for r in g.itertuples()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    record = dict(
        world={k: v for k, v in vars(WORLD).items()},
        pretrain=dict(
            slides=N_PRETRAIN,
            val_slides=N_PRE_VAL,
            epochs=PRETRAIN_EPOCHS,
            genes=len(every) - NEW,
            seconds=pretrain_s,
        ),  # fmt: skip
        panel=panel,
        new_genes=sorted(new),
        val_slides=N_VAL,
        test_slides=N_TEST,
        scratch_epochs=SCRATCH_EPOCHS,
        rows=rows,
        table="\n".join(lines),
        seconds=time.perf_counter() - t_start,
        torch_threads=torch.get_num_threads(),
    )
    OUT.write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
