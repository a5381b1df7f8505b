"""Attribution benchmark: do ``histoprism explain``'s maps point at what drives a programme?

The built-in synthetic generator knows, for every gene programme (a GPC gene set), its drivers:
the spot's own state (six niches, nuclear density, texture), its neighbourhood within 300 µm
(tumour x nearby immune, tumour x nearby stroma, nearby necrosis, stroma x nearby tumour), the
slide (tumour x the slide's immune share), or hidden fields that morphology cannot see. This
script writes a small synthetic cohort, trains HistoPrism on it (the library's ``train``), then
replays the generator in-process from the config's seed (world and slide random streams, as
``make_cohort`` draws them) to get each programme's drivers and each held-out spot's niche and
driver values, and explains every programme with >= 3 panel genes on every held-out slide.

Measured, per (slide, programme), with the programme's *primary driver* = the driver of largest
mean |weight| over the cancer types (visible or hidden):

* ``auroc_abs``: AUROC of |IG attribution| for the spots of the driving niche (the spot's
  dominant niche; for a non-niche driver, the slide's top quarter of that driver's value);
  ``auroc_signed``: the same for the attribution times the sign of the driver's weight;
  ``auroc_pred``: the same for the predicted pathway score itself (what the model knows at all);
* ``share``: the neighbourhood share of ``explain``, and ``true_share``: the same ratio computed
  from the generator's own log-mean split into spot-driver and context-driver parts
  (mean |context part| / (mean |context part| + mean |spot part|), each centred over the slide).

    python benchmarks/explain.py                 # ~8 min on 2 cores
    python benchmarks/explain.py --epochs 40 --slides 16 --per-group 40 --steps 32

Prints a table and writes ``benchmarks/explain.json`` (settings, per-group summary and every
record).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from scipy.stats import spearmanr

from histoprism.expression.pathways import default_genesets
from histoprism.inference.explain import Target, explain_slide
from histoprism.io.cohort import Cohort
from histoprism.models.run import load
from histoprism.synthetic import cohort as syn_cohort
from histoprism.synthetic import tissue as syn_tissue
from histoprism.synthetic import world as syn
from histoprism.training.api import train

ENCODER = "synthetic"
OUT = Path(__file__).with_name("explain.json")
NICHE_TOP = 0.25  # non-niche drivers: the slide's top quarter of the driver's value is "driven"
GROUPS = ("spot", "neighbourhood", "slide", "hidden")


def world_config(slides: int, seed: int, spot_noise: float | None = None) -> syn.SyntheticConfig:
    """A small world: 2 cancers, 200-400 spots, 800 genes, 64-d embeddings; ``spot_noise``: the
    per-spot embedding noise sd (default: the built-in world's)."""
    noise = {} if spot_noise is None else {"spot_noise_sd": spot_noise}
    return syn.SyntheticConfig(
        **noise,
        n_slides=slides,
        n_cancers=2,
        spots=(200, 400),
        n_genes=800,
        embed_dim=64,
        targeted_fraction=0.0,
        seed=seed,
    )


def programme_drivers(cfg: syn.SyntheticConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Replay the start of ``synthetic.world.make_world``: programme names, visible (C, Kd, P) and
    hidden (N_HIDDEN, P) driver -> activity maps."""
    world_seq = np.random.SeedSequence(cfg.seed).spawn(2 + cfg.n_slides)[0]
    rng = np.random.default_rng(world_seq)
    genes = syn._gene_universe(cfg, rng)
    syn._loadings(genes, rng)  # consumes its draws, as make_world does
    names = list(genes.sets)
    visible, hidden = syn._programme_drivers(names, cfg, rng)
    return names, visible, hidden


def primary(visible: np.ndarray, hidden: np.ndarray, p: int) -> tuple[str, int, str, float]:
    """(group, driver index, driver name, sign) of programme p's largest mean |weight|."""
    vis = np.abs(visible[:, :, p]).mean(0)  # (Kd,)
    hid = np.abs(hidden[:, p])
    if hid.max() > vis.max():
        return (
            "hidden",
            int(hid.argmax()),
            f"hidden_{hid.argmax()}",
            float(np.sign(hidden[hid.argmax(), p])),
        )
    k = int(vis.argmax())
    sign = float(np.sign(visible[:, k, p].mean()))
    name = syn.VIS_DRIVERS[k]
    if k < syn.N_SPOT_DRIVERS:
        return "spot", k, name, sign
    return ("slide" if name == "tumour_x_slide_immune" else "neighbourhood"), k, name, sign


def choose(
    names: list[str], visible: np.ndarray, hidden: np.ndarray, per_group: int, seed: int
) -> set[int]:
    """At most ``per_group`` programmes of each primary-driver group, drawn with ``seed``: IG
    costs ``steps`` forward and backward passes per programme and slide."""
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    for p in range(len(names)):
        by_group.setdefault(primary(visible, hidden, p)[0], []).append(p)
    out: set[int] = set()
    for members in by_group.values():
        out.update(int(p) for p in rng.permutation(members)[:per_group])
    return out


def slide_tissues(cfg: syn.SyntheticConfig) -> dict[str, tuple[int, object]]:
    """Replay every slide's tissue (the first draws of its stream): id -> (cancer, Tissue)."""
    _, table_seq, *slide_seqs = np.random.SeedSequence(cfg.seed).spawn(2 + cfg.n_slides)
    table = syn_cohort._slide_table(cfg, np.random.default_rng(table_seq))
    shape = syn_tissue.frame_shape(cfg)
    out = {}
    for row, seq in zip(table.to_dict("records"), slide_seqs, strict=True):
        rng = np.random.default_rng(seq)
        out[row["id"]] = (
            int(row["cancer"]),
            syn_tissue.draw_tissue(rng, shape, int(row["n_spots"]), int(row["cancer"]), cfg),
        )
    return out


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``score`` for the positives of ``label`` (NaN without both)."""
    pos, n = int(label.sum()), len(label)
    if pos == 0 or pos == n:
        return float("nan")
    ranks = np.empty(n)
    order = np.argsort(score, kind="mergesort")
    ranks[order] = np.arange(1, n + 1)
    # average ranks over ties
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, ranks)
    ranks = sums[inv] / counts[inv]
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


def true_share(tissue, visible: np.ndarray, cancer: int, p: int) -> float:
    """The generator's neighbourhood share of programme p's visible activity on a slide."""
    v = visible[cancer, :, p]
    k = syn.N_SPOT_DRIVERS
    own = tissue.drivers[:, :k] @ v[:k]
    ctx = tissue.drivers[:, k:] @ v[k:]
    o, c = np.abs(own - own.mean()).mean(), np.abs(ctx - ctx.mean()).mean()
    return float(c / (c + o)) if c + o > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument(
        "--per-group", type=int, default=10, help="programmes per primary-driver group (seeded)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="default", help="train recipe: preset or YAML/JSON file")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON written")
    ap.add_argument("--spot-noise", type=float, default=None, help="per-spot embedding noise sd")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = world_config(args.slides, args.seed, args.spot_noise)
    names, visible, hidden = programme_drivers(cfg)
    tissues = slide_tissues(cfg)
    chosen = choose(names, visible, hidden, args.per_group, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cohort_dir = syn_cohort.make_cohort(Path(tmp) / "cohort", config=cfg)
        run_dir = train(
            cohort_dir, ENCODER, Path(tmp) / "run", epochs=args.epochs, seed=0, progress=False,
            config=args.config,
        )  # fmt: skip
        t_train = time.perf_counter() - t0
        run = load(run_dir, device="cpu")
        cohort = Cohort(cohort_dir)
        held_out = cohort.ids("val") + cohort.ids("test")
        sets = default_genesets(run.panel)
        records = []
        for sid in held_out:
            slide = cohort.slide(sid, ENCODER)
            cancer, tissue = tissues[sid]
            index = {(int(x), int(y)): i for i, (x, y) in enumerate(tissue.xy)}
            rows = np.array([index[(int(round(x)), int(round(y)))] for x, y in slide.coords])
            drivers, niche = tissue.drivers[rows], tissue.composition[rows].argmax(1)
            check_replay(cohort_dir, sid, tissue, index)
            for p, name in enumerate(names):
                if p not in chosen:
                    continue
                genes = tuple(dict.fromkeys(g for g in sets.get(name, ()) if g in run.panel.index))
                if len(genes) < 3:
                    continue
                group, k, driver, sign = primary(visible, hidden, p)
                ex = explain_slide(
                    run, slide, Target(name, name, "gene set", genes), steps=args.steps
                )
                if group == "hidden":
                    label = None
                elif k < len(syn.NICHES):
                    label = niche == k
                else:
                    label = drivers[:, k] >= np.quantile(drivers[:, k], 1 - NICHE_TOP)
                nan = float("nan")
                records.append(
                    {
                        "slide": sid,
                        "programme": name,
                        "group": group,
                        "driver": driver,
                        "n_spots": len(rows),
                        "driven_spots": None if label is None else int(label.sum()),
                        "auroc_abs": nan if label is None else auroc(np.abs(ex.attribution), label),
                        "auroc_signed": nan
                        if label is None
                        else auroc(sign * ex.attribution, label),
                        "auroc_pred": nan if label is None else auroc(sign * ex.prediction, label),
                        "share": ex.neighbourhood_share,
                        "true_share": true_share(_Rows(tissue, rows), visible, cancer, p),
                        "completeness_rel": abs(ex.completeness_error) / max(abs(ex.delta), 1e-12),
                    }
                )
    summary = summarise(records)
    seconds = time.perf_counter() - t0
    print_table(summary, records, seconds, t_train)
    args.out.write_text(
        json.dumps(
            {
                "settings": {
                    **vars(args),
                    "out": str(args.out),
                    "world": asdict(cfg),
                    "seconds": round(seconds, 1),
                },
                "summary": summary,
                "records": records,
            },
            indent=1,
            default=float,
        )
    )


def check_replay(cohort_dir: Path, sid: str, tissue, index: dict) -> None:
    """The replayed niche composition is the one the cohort's ceiling file holds."""
    ceiling = ad.read_h5ad(Path(cohort_dir) / "ceiling" / f"{sid}.h5ad")
    rows = [index[(int(round(x)), int(round(y)))] for x, y in ceiling.obsm["spatial"]]
    if not np.allclose(ceiling.obsm["niche_composition"], tissue.composition[rows], atol=1e-5):
        raise RuntimeError(f"{sid}: the replayed tissue is not the cohort's (generator changed?)")


class _Rows:
    """A tissue's drivers restricted to the cohort's aligned spots."""

    def __init__(self, tissue, rows: np.ndarray):
        self.drivers = tissue.drivers[rows]


def summarise(records: list[dict]) -> dict:
    """Per group: programmes, (slide, programme) pairs, mean AUROCs, mean shares."""
    out = {}
    for g in GROUPS:
        rs = [r for r in records if r["group"] == g]
        if not rs:
            continue
        out[g] = {
            "programmes": len({r["programme"] for r in rs}),
            "pairs": len(rs),
            **{
                k: _mean(rs, k)
                for k in ("auroc_abs", "auroc_signed", "auroc_pred", "share", "true_share")
            },
        }
    share = np.array([r["share"] for r in records])
    truth = np.array([r["true_share"] for r in records])
    ok = np.isfinite(share) & np.isfinite(truth)
    out["spearman_share_vs_true"] = float(spearmanr(share[ok], truth[ok]).statistic)
    out["max_completeness_rel"] = float(max(r["completeness_rel"] for r in records))
    return out


def _mean(records: list[dict], key: str) -> float:
    """Mean of a record field over its finite values (NaN when none)."""
    values = np.array([r[key] for r in records], dtype=float)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def print_table(summary: dict, records: list[dict], seconds: float, t_train: float) -> None:
    print(
        "| primary driver | programmes | slide x programme | AUROC abs(IG) | AUROC signed IG | AUROC prediction | neighbourhood share | generator's share |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for g in GROUPS:
        if g not in summary:
            continue
        s = summary[g]
        print(
            f"| {g} | {s['programmes']} | {s['pairs']} | {s['auroc_abs']:.3f} | {s['auroc_signed']:.3f} | "
            f"{s['auroc_pred']:.3f} | {s['share']:.3f} | {s['true_share']:.3f} |"
        )
    print(
        f"\nSpearman(share, generator's share) over {len(records)} pairs: "
        f"{summary['spearman_share_vs_true']:.3f}; worst IG completeness error "
        f"{summary['max_completeness_rel']:.2%} of f(x) - f(baseline); "
        f"{seconds:.0f} s ({t_train:.0f} s cohort + training)"
    )


if __name__ == "__main__":
    main()
