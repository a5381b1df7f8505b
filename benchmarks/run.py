"""Speed and memory of HistoPrism on this machine, against its own GEMM ceiling and two references.

    python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--device cpu|cuda]
    python benchmarks/run.py --profile          # torch.profiler top items: train step, prediction

Every measurement runs in a fresh child process (this script with ``--child``), so that its peak
RSS (``os.wait4``'s ``ru_maxrss``) is its own. Models have the paper's shape (UNI 1024-d inputs,
hidden 256, 2 layers, 8 heads) and random weights: speed does not depend on the values. Slides are
synthetic: random embeddings on a Visium HD 16 µm grid (a 200k-spot slide is ~7 x 7 mm, one HD
capture area). What each number times is written into the JSON under ``timed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GENES = 38_982  # the STPath panel the paper predicts
PITCH_UM = 16.0  # Visium HD bin
PAPER_GPU = dict(spots=19_600, seconds=0.109, memory_gb=3.15)  # paper: A100, full output in fp32

TIMED_FACTORISED = (
    "scaling entries with output=factorised (--visium-hd): predict_slide with output='factorised' "
    "on an 8 µm grid (pitch_um) by the default recipe's network: trunk (64 µm sites, rings, "
    "attention over the sites), closed-form pathway scores and "
    "the h5ad (hidden layer float16, head float32); output_mb = file size; read_gene_seconds = "
    "histoprism.io.prediction.read_genes of one gene for every bin; read_pathway_seconds = "
    "read_pathways of one Hallmark set (closed form), both from the just-written file"
)
TIMED_PITCH = (
    "pitch entries (--pitch): predict_slide with output='factorised' of the same 2 x 2 mm square "
    "of tissue binned at each pitch, by the default recipe's network (variant histoprism: sites of "
    "64 µm and rings) and the recipe before it (neighbour-mean: 6-neighbour mean, dense "
    "attention up to 20k spots, local 400 µm above); us_per_spot = seconds / spots"
)
TIMED = {
    "gemm_gflops": "best of 3 torch.mm of two 4096 x 4096 float32 matrices (2·4096³ FLOP)",
    "inference": "trunk (embeddings -> (N, H), dense attention up to 20k spots), once, + the head "
    "for every spot and all 38,982 genes in float32, tile by tile into a reused buffer, as predict "
    "computes them (best of 3 passes, as the GEMM); excludes reading embeddings, the h5ad write "
    "and pathway scores (see scaling). gemm_gflops: the best 4096³ GEMM of the run. "
    "gflops counts the model's multiply-adds x2: head 2·N·H·G, attention 4·N·N·H per layer, "
    "linear layers; roofline_ratio = gflops / gemm_gflops",
    "training": "one optimiser step on one slide: forward, masked MSE on all 38,982 genes, "
    "backward, gradient clipping, AdamW; mean of the steps after 1 warm-up; paper's dropout 0.1 "
    "(attention weights too). seconds_per_epoch_500_slides = 500 x seconds_per_slide (no validation)",
    "scaling": "histoprism.inference.predict.predict_slide: trunk (auto attention: dense up to 20k spots, "
    "local 400 µm above), head, pathway scores and the h5ad written to disk (X in float16)",
    "scaling_factorised": TIMED_FACTORISED,
    "reference.dense": "inference: the paper's way, one forward with dense attention, the whole "
    "(N, 38,982) float32 output in memory at once; training: the full output, then the masked "
    "loss; scaling: predict_slide with dense attention forced at every size",
    "reference.ridge": "HEST-bench ridge (PCA 256 -> ridge, random coefficients): prepare + every "
    "gene block of predict_genes (inference); predict_slide to h5ad (scaling)",
}


# --- synthetic inputs ------------------------------------------------------------------------------
def grid_um(n: int, pitch_um: float = PITCH_UM) -> np.ndarray:
    """(n, 2) spot centres in µm on a square Visium HD grid (16 µm bins unless told)."""
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.divmod(np.arange(n), side)
    return np.stack([xx, yy], axis=1).astype(np.float64) * pitch_um


def make_slide(n: int, dim: int = 1024, seed: int = 0, pitch_um: float = PITCH_UM):
    from histoprism.io.cohort import Slide

    rng = np.random.default_rng(seed)
    return Slide(
        id=f"bench{n}",
        cancer="IDC",
        barcodes=np.char.add("s", np.arange(n).astype(str)),
        features=rng.standard_normal((n, dim), dtype=np.float32),
        coords=grid_um(n, pitch_um) / 0.5,  # level-0 pixels at 0.5 µm/px
        pixel_size_um=0.5,
    )


def make_model(attention: str = "auto", device: str = "cpu", variant: str | None = None):
    """The paper's shape at 38,982 genes; ``variant``: with that registry row's recipe (the
    default recipe plus its overrides), else ModelConfig's own settings."""
    from histoprism.models.network import HistoPrism, ModelConfig
    from histoprism.models.registry import VARIANTS
    from histoprism.training.recipes import resolve_config

    recipe = resolve_config(VARIANTS[variant].config or "default")[0] if variant else {}
    if attention != "auto" or not variant:
        recipe["attention"] = attention
    torch.manual_seed(0)
    return HistoPrism(ModelConfig(**{**recipe, "n_genes": GENES})).to(device)


def make_run(kind: str, device: str = "cpu", attention: str = "auto", variant: str | None = None):
    """An in-memory ``predict.Run`` over the real 38,982-gene panel (Ensembl ids)."""
    from histoprism.expression.genes import GenePanel, data_path
    from histoprism.models.baselines import RidgeBaseline
    from histoprism.models.inputs import CancerVocabulary
    from histoprism.models.run import HistoPrismPredictor, Run

    genes = tuple(data_path("stpath_gene_panel.ensembl.txt").read_text().split())
    panel, vocab = GenePanel(genes), CancerVocabulary(("IDC", "Unknown"))
    if kind == "histoprism":
        dev = torch.device(device)
        model = make_model(attention, device, variant).eval()
        predictor = HistoPrismPredictor(model, vocab, dev)
    else:
        rng = np.random.default_rng(0)
        k, d = 256, 1024
        t = dict(
            scaler_mean=rng.standard_normal(d),
            scaler_scale=np.ones(d),
            pca_mean=np.zeros(d),
            pca_components=np.linalg.qr(rng.standard_normal((d, k)))[0].T,
            coef=rng.standard_normal((len(genes), k)) * 0.01,
            mean=rng.random(len(genes)),
        )
        predictor = RidgeBaseline.from_tensors(
            panel, 0, {n: torch.from_numpy(v) for n, v in t.items()}
        )
    config = {"model": kind, "encoder": "uni"}
    return Run(Path(tempfile.gettempdir()) / "bench_run", config, predictor, panel, vocab)


def model_flops(n: int, *, hidden=256, in_dim=1024, layers=2, ff=4, genes=GENES, keys=None):
    """Multiply-adds x2 of one forward over n spots (the per-cancer shift is negligible)."""
    keys = n if keys is None else keys  # attention pairs per query: every spot when dense
    per_layer = 2 * hidden * (3 * hidden + hidden + 2 * ff * hidden) + 4 * keys * hidden
    trunk = n * (2 * in_dim * hidden + layers * per_layer + 2 * hidden * hidden)
    return trunk, 2 * n * hidden * genes


# --- children: one measurement each ------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_seconds(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(device: str, n: int = 4096) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), 4, device) / 1e9


def gpu_memory(device: str) -> dict:
    """Peak GPU memory of the process (the paper's 3.15 GB is this), on a GPU only."""
    if not device.startswith("cuda"):
        return {}
    return {"gpu_max_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def child_gemm(spec: dict) -> dict:
    return {"gflops": gemm_gflops(spec["device"])}


def child_inference(spec: dict) -> dict:
    """HistoPrism: the trunk once, then every head tile (what predict_slide computes), best of 3
    passes as for the GEMM; the GEMM ceiling is measured here too, under the same conditions."""
    from histoprism.inference.writer import TILE_GENES, TILE_SPOTS, tiles

    n, dev = spec["spots"], spec["device"]
    p = make_run("histoprism", dev).predictor
    buf = torch.empty(min(n, TILE_SPOTS) * TILE_GENES, device=dev)

    def head(h):  # what predict_slide computes, tile by tile, without the file
        for rows, cols in tiles(n, GENES, TILE_SPOTS, TILE_GENES):
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            out = buf[: shape[0] * shape[1]].view(shape)
            if dev == "cpu":
                p.predict_genes(h, cols, rows, out=out)
            else:  # tiles stay on the GPU: the copy to the host is the writer's cost
                w, b = p.model.head_out.weight[cols], p.model.head_out.bias[cols]
                torch.addmm(b, h[rows], w.T, out=out)

    with torch.no_grad():
        head(p.prepare(make_slide(min(n, 512))))  # warm-up: kernels, thread pools, buffer pages
        slide = make_slide(n)
        sync(dev)
        t0 = time.perf_counter()
        h = p.prepare(slide)
        sync(dev)
        trunk = time.perf_counter() - t0
        # the head and the GEMM ceiling in turns, best of 3 each: the same conditions for both on
        # a machine that other processes may share
        gemm, head_s = 0.0, float("inf")
        for _ in range(3):
            gemm = max(gemm, gemm_gflops(dev))
            head_s = min(head_s, best_seconds(lambda: head(h), 1, dev))
    attention = "local" if p.model.uses_local_attention(n) else "full"
    return dict(
        trunk_seconds=trunk,
        head_seconds=head_s,
        attention=attention,
        gemm_gflops=gemm,
        **gpu_memory(dev),
    )


def child_dense(spec: dict) -> dict:
    """The paper's way: dense attention, one forward, the whole (N, G) output at once."""
    n, dev = spec["spots"], spec["device"]
    model = make_model("full", dev).eval()
    x = lambda s: dict(  # noqa: E731
        features=torch.from_numpy(s.features)[None].to(dev),
        condition=torch.tensor([0], device=dev),
        coords_um=torch.from_numpy(s.coords_um).float()[None].to(dev),
    )
    with torch.no_grad():
        model(**x(make_slide(256)))
        inputs = x(make_slide(n))
        if dev != "cpu":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t0 = time.perf_counter()
        out = model(**inputs)
        sync(dev)
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "attention": "full",
        "output_gb": out.numel() * 4 / 1e9,
        **gpu_memory(dev),
    }


def child_ridge(spec: dict) -> dict:
    from histoprism.inference.writer import tile_shape

    n = spec["spots"]
    run = make_run("ridge")
    slide = make_slide(n)
    run.predictor.predict_genes(run.predictor.prepare(make_slide(256)), slice(0, 64))
    t0 = time.perf_counter()
    prepared = run.predictor.prepare(slide)
    _, cols = tile_shape(n, GENES, whole_columns=True)
    for c in range(0, GENES, cols):
        run.predictor.predict_genes(prepared, slice(c, min(c + cols, GENES)))
    return {"seconds": time.perf_counter() - t0, "attention": "none"}


def child_train(spec: dict) -> dict:
    """One slide per AdamW step, as train.py: measured genes only (here: all of them)."""
    from histoprism.models.inputs import SlideTensors
    from histoprism.training.loop import masked_mse, train_step

    n, dev = spec["spots"], spec["device"]
    model = make_model("full", dev).train()
    if spec.get("attn_dropout") is not None:
        for block in model.blocks:
            block.attn_dropout = spec["attn_dropout"]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    rng = np.random.default_rng(0)
    s = SlideTensors(
        id="s",
        cancer="IDC",
        condition=0,
        features=torch.from_numpy(rng.standard_normal((n, 1024), dtype=np.float32)).to(dev),
        coords_um=torch.from_numpy(grid_um(n)).float().to(dev),
        neighbours=None,
        target=torch.from_numpy(rng.random((n, GENES), dtype=np.float32)).to(dev),
        target_cols=torch.arange(GENES, device=dev),
    )
    inputs = s.model_inputs(dev)
    times = []
    for _ in range(spec.get("steps", 3)):
        sync(dev)
        t0 = time.perf_counter()
        if spec.get("paper_loss"):  # the whole (N, G) output, then the measured columns
            loss = masked_mse(model(**inputs), s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:  # train.py's own step
            train_step(model, opt, inputs, s, grad_clip=1.0)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"seconds_per_slide": float(np.mean(times[1:])), "step_seconds": times}  # 1st: warm-up


def child_scaling(spec: dict) -> dict:
    """The real prediction path, to an h5ad file on disk (deleted afterwards)."""
    from histoprism.inference.predict import predict_slide

    n, dev = spec["spots"], spec["device"]
    attention = spec.get("attention", "auto")
    run = make_run(spec["model"], dev, attention=attention, variant=spec.get("variant"))
    slide = make_slide(n, pitch_um=spec.get("pitch_um", PITCH_UM))
    out = Path(spec["tmp"]) / f"{spec['model']}_{n}.h5ad"
    output = spec.get("output", "dense")
    t0 = time.perf_counter()
    predict_slide(run, slide, out, dtype=spec["dtype"], output=output)
    seconds = time.perf_counter() - t0
    size = out.stat().st_size / 1e9
    reads = _time_reads(out, run.panel.genes) if spec.get("reads") else {}
    out.unlink()
    sites = n
    if spec["model"] == "histoprism":
        model = run.predictor.model
        if model.needs_spatial_plan:
            sites = model.spatial_plan(torch.from_numpy(slide.coords_um).float()).n_sites
        local, dense = model.uses_local_attention(sites), model.dense_heads(sites)
        attention = ("mixed" if dense else "local") if local else "full"
    else:
        attention = "none"
    res = {"seconds": seconds, "file_gb": size, "output_mb": size * 1e3, "attention": attention}
    res["sites"] = sites
    return {**res, "output": output, **reads, **gpu_memory(dev)}


def _time_reads(path: Path, genes) -> dict:
    """Seconds to read one gene, and one Hallmark set's score, for every spot of a written file
    (cold page cache is not forced: the file was just written)."""
    from histoprism.expression.genes import gpc_genesets
    from histoprism.io.prediction import read_genes, read_pathways

    t0 = time.perf_counter()
    x = read_genes(path, [genes[len(genes) // 2]])
    t1 = time.perf_counter()
    name, members = next(iter(gpc_genesets("hallmark", ids="ensembl").items()))
    scores = read_pathways(path, {name: members})
    t2 = time.perf_counter()
    assert x.shape[0] == scores.shape[0]
    return {"read_gene_seconds": t1 - t0, "read_pathway_seconds": t2 - t1}


CHILDREN = {
    "gemm": child_gemm,
    "inference": child_inference,
    "dense": child_dense,
    "ridge": child_ridge,
    "train": child_train,
    "scaling": child_scaling,
}


def measure(spec: dict, timeout: float) -> dict:
    """Run one child; its result plus wall seconds and peak RSS (MB, the child's own ru_maxrss
    from ``os.wait4``, via ``histoprism.workflows.benchmark.measure_process``), or an error (timeout,
    crash, out of memory)."""
    # imported here, not at the top: children must not load it (it would add to their RSS)
    from histoprism.workflows.benchmark import measure_process

    m = measure_process([sys.executable, __file__, "--child", json.dumps(spec)], timeout=timeout)
    if m["timed_out"]:
        return {"error": f"timed out after {timeout:.0f} s"}
    if m["returncode"] != 0:
        last = (m["stderr"].strip().splitlines() or [""])[-1]
        return {"error": f"exit {m['returncode']}: {last}"[:200]}
    res = json.loads(m["stdout"].strip().splitlines()[-1])
    res["wall_seconds"] = m["seconds"]
    res["peak_rss_mb"] = m["peak_rss_mb"]
    return res


def run_child(spec: dict) -> None:
    load = os.getloadavg()[0]  # before this child adds to it: were other processes running?
    print(json.dumps({**CHILDREN[spec["kind"]](spec), "load_avg_1min": load}))


# --- the plan ---------------------------------------------------------------------------------------
def plan(quick: bool) -> dict:
    """Sizes per series. Up to 20k spots HistoPrism's auto attention is dense, so the dense
    reference differs from it above that (and in computing the whole output at once)."""
    if quick:
        return dict(
            inference=[1_000, 5_000],
            train_spots=1_000,
            train_steps=3,
            scaling=[1_000, 5_000, 20_000, 50_000],
            dense_scaling=[5_000, 20_000],
            ridge_scaling=[1_000, 5_000, 20_000],
        )
    return dict(
        inference=[1_000, 5_000, 20_000],
        train_spots=4_992,  # a full Visium capture area
        train_steps=2,
        scaling=[1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000],
        dense_scaling=[5_000, 20_000, 50_000],
        ridge_scaling=[1_000, 5_000, 20_000, 50_000, 100_000],
    )


def inference_entry(n: int, res: dict, gemm: float) -> dict:
    """Ratios against the GEMM measured beside the head in the same process when there is one
    (``gemm_gflops_here``), else against the run's ceiling."""
    if "error" in res:
        return {"spots": n, "genes": GENES, **res}
    trunk_f, head_f = model_flops(n)
    secs = res.get("seconds", res.get("trunk_seconds", 0) + res.get("head_seconds", 0))
    ceiling = res.get("gemm_gflops", gemm)
    e = {"spots": n, "genes": GENES, "seconds": secs}
    e["gflops"] = (trunk_f + head_f) / secs / 1e9
    e["roofline_ratio"] = e["gflops"] / ceiling
    e["peak_rss_mb"] = res["peak_rss_mb"]
    e["attention"] = res["attention"]
    if "head_seconds" in res:
        e["trunk_seconds"], e["head_seconds"] = res["trunk_seconds"], res["head_seconds"]
        e["head_gflops"] = head_f / res["head_seconds"] / 1e9
        e["head_roofline_ratio"] = e["head_gflops"] / ceiling
        e["gemm_gflops_here"] = ceiling
    for k in ("gpu_max_memory_gb", "output_gb", "load_avg_1min"):
        if k in res:
            e[k] = res[k]
    return e


def ridge_entry(n: int, res: dict, gemm: float) -> dict:
    if "error" in res:
        return {"spots": n, "genes": GENES, **res}
    flops = 2 * n * 1024 * 256 + 2 * n * 256 * GENES
    g = flops / res["seconds"] / 1e9
    return dict(
        spots=n,
        genes=GENES,
        seconds=res["seconds"],
        gflops=g,
        roofline_ratio=g / gemm,
        peak_rss_mb=res["peak_rss_mb"],
        attention="none",
        load_avg_1min=res["load_avg_1min"],
    )


def scaling_entry(n: int, res: dict, dtype: str) -> dict:
    if "error" in res:
        return {"spots": n, **res}
    keep = (
        "seconds",
        "peak_rss_mb",
        "attention",
        "file_gb",
        "output_mb",
        "output",
        "read_gene_seconds",
        "read_pathway_seconds",
        "load_avg_1min",
        "gpu_max_memory_gb",
        "sites",
    )
    return {"spots": n, **{k: res[k] for k in keep if k in res}, "dtype": dtype}


VISIUM_HD = dict(spots=[200_000, 600_000], pitch_um=8.0)  # a whole slide of 8 µm bins
# the same 2 x 2 mm of tissue at each pitch: Visium-like 100 µm, Visium HD 16, 8 and 2 µm
PITCH = dict(side_um=2_000.0, pitches_um=[100.0, 16.0, 8.0, 2.0], timeout=300)
PITCH_VARIANTS = ("histoprism", "neighbour-mean")  # the default, and the one before the rings


def visium_hd(args) -> list[dict]:
    """Whole Visium HD slides predicted to factorised files (8 µm bins, 38,982 genes) by the
    default recipe's network, with the time to read one gene and one pathway back for every bin."""
    tmp = Path(tempfile.mkdtemp(prefix="histoprism_bench_", dir=args.tmp))
    rows = []
    for n in VISIUM_HD["spots"]:
        spec = dict(
            kind="scaling",
            device=args.device,
            spots=n,
            model="histoprism",
            variant="histoprism",
            dtype="float16",
            output="factorised",
            pitch_um=VISIUM_HD["pitch_um"],
            reads=True,
            tmp=str(tmp),
        )
        entry = scaling_entry(n, measure(spec, 3600), "float16")
        rows.append({**entry, "pitch_um": VISIUM_HD["pitch_um"], "variant": "histoprism"})
        print(f"  visium-hd {n:>7,} bins: {_brief(rows[-1])}")
    return rows


def per_pitch(args) -> list[dict]:
    """The same tissue area predicted (factorised output) at every pitch of PITCH, by the
    default recipe and the one before it: time per spot should follow the tissue, not the pitch."""
    tmp = Path(tempfile.mkdtemp(prefix="histoprism_bench_", dir=args.tmp))
    rows = []
    for variant in args.pitch_variants:
        for pitch in PITCH["pitches_um"]:
            n = int(round(PITCH["side_um"] / pitch)) ** 2
            spec = dict(
                kind="scaling",
                device=args.device,
                spots=n,
                model="histoprism",
                variant=variant,
                dtype="float16",
                output="factorised",
                pitch_um=pitch,
                tmp=str(tmp),
            )
            e = scaling_entry(n, measure(spec, PITCH["timeout"]), "float16")
            e = {
                "variant": variant,
                "pitch_um": pitch,
                "area_mm2": (PITCH["side_um"] / 1e3) ** 2,
                **e,
            }
            if "seconds" in e:
                e["us_per_spot"] = e["seconds"] / n * 1e6
            rows.append(e)
            print(f"  {variant} {pitch:>5} µm {n:>9,} spots: {_brief(e)}")
    return rows


def pitch_table(rows: list[dict]) -> str:
    """Markdown: per pitch and variant, seconds, µs per spot and peak RSS."""
    seen = list(dict.fromkeys(e["variant"] for e in rows))
    variants = [v for v in PITCH_VARIANTS if v in seen] + [
        v for v in seen if v not in PITCH_VARIANTS
    ]
    pitches = list(dict.fromkeys(e["pitch_um"] for e in rows))
    lines = [
        "| pitch | spots | "
        + " | ".join(f"{v}: s / µs per spot / peak GB" for v in variants)
        + " |",
        "|---" * (2 + len(variants)) + "|",
    ]
    for p in pitches:
        cells, n = [], ""
        for v in variants:
            e = next((x for x in rows if x["variant"] == v and x["pitch_um"] == p), None)
            if e is None:
                cells.append("")
                continue
            n = f"{e['spots']:,}"
            if "error" in e:
                cells.append(e["error"])
            else:
                sites = (
                    f", {e['sites']:,} sites" if e.get("sites", e["spots"]) != e["spots"] else ""
                )
                cells.append(
                    f"{e['seconds']:.1f} / {e['us_per_spot']:.0f} / "
                    f"{e['peak_rss_mb'] / 1e3:.2f} ({e['attention']}{sites})"
                )
        lines.append(f"| {p:g} µm | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark(args) -> dict:
    p, dev = plan(args.quick), args.device
    say = print
    tmp = Path(tempfile.mkdtemp(prefix="histoprism_bench_", dir=args.tmp))
    limit = 900 if not args.quick else 300
    gemm = measure({"kind": "gemm", "device": dev}, 120)["gflops"]
    say(f"GEMM ceiling: {gemm:.1f} GFLOP/s")
    results: dict = {"gemm_gflops": gemm}
    inference = [
        measure({"kind": "inference", "device": dev, "spots": n}, limit) for n in p["inference"]
    ]
    # the ceiling is the best GEMM seen (other processes on the machine only ever slow it down)
    gemm = max([gemm] + [r["gemm_gflops"] for r in inference if "gemm_gflops" in r])
    results["gemm_gflops"] = gemm

    def series(kind, ns, entry, **extra):
        rows = []
        for n in ns:
            res = measure({"kind": kind, "device": dev, "spots": n, **extra}, limit)
            rows.append(entry(n, res))
            say(f"  {kind} {n:>7,} spots: {_brief(rows[-1])}")
        return rows

    results["inference"] = [
        inference_entry(n, r, gemm) for n, r in zip(p["inference"], inference, strict=True)
    ]
    for e in results["inference"]:
        say(f"  inference {e['spots']:>7,} spots: {_brief(e)}")
    say("training step:")
    train = {}
    steps = {"steps": p["train_steps"]}
    for name, extra in (("histoprism", {}), ("no_attention_dropout", {"attn_dropout": 0.0})):
        spec = {"kind": "train", "device": dev, "spots": p["train_spots"], **steps, **extra}
        r = measure(spec, limit)
        train[name] = r
        say(f"  {name}: {_brief(r)}")
    results["training"] = _training_entry(train["histoprism"], p["train_spots"])
    results["training"]["without_attention_dropout"] = _training_entry(
        train["no_attention_dropout"], p["train_spots"]
    )
    say("scaling (predict_slide -> h5ad, float16):")
    results["scaling"] = series(
        "scaling",
        p["scaling"],
        lambda n, r: scaling_entry(n, r, "float16"),
        model="histoprism",
        dtype="float16",
        tmp=str(tmp),
    )
    say("reference: dense attention (the paper's inference), ridge:")
    spec = {"kind": "train", "device": dev, "spots": p["train_spots"], "paper_loss": True}
    dense_train = measure({**spec, **steps}, limit)
    results["reference"] = {
        "dense": {
            "inference": series("dense", p["inference"], lambda n, r: inference_entry(n, r, gemm)),
            "training": _training_entry(dense_train, p["train_spots"]),
            "scaling": series(
                "scaling",
                p["dense_scaling"],
                lambda n, r: scaling_entry(n, r, "float16"),
                model="histoprism",
                attention="full",
                dtype="float16",
                tmp=str(tmp),
            ),
        },
        "ridge": {
            "inference": series("ridge", p["inference"], lambda n, r: ridge_entry(n, r, gemm)),
            "scaling": series(
                "scaling",
                p["ridge_scaling"],
                lambda n, r: scaling_entry(n, r, "float16"),
                model="ridge",
                dtype="float16",
                tmp=str(tmp),
            ),
        },
    }
    if dev.startswith("cuda"):
        res = measure({"kind": "dense", "device": dev, "spots": PAPER_GPU["spots"]}, limit)
        results["paper_gpu_comparison"] = {"paper": PAPER_GPU, "ours_dense_forward": res}
    tmp.rmdir()
    return results


def _training_entry(res: dict, n: int) -> dict:
    if "error" in res:
        return {"spots": n, "genes": GENES, **res}
    s = res["seconds_per_slide"]
    return dict(
        seconds_per_slide=s,
        spots=n,
        genes=GENES,
        seconds_per_epoch_500_slides=500 * s,
        peak_rss_mb=res["peak_rss_mb"],
        step_seconds=res["step_seconds"],
        load_avg_1min=res["load_avg_1min"],
    )


def _brief(e: dict) -> str:
    if "error" in e:
        return f"ERROR {e['error']}"
    keys = (
        "seconds",
        "output_mb",
        "read_gene_seconds",
        "read_pathway_seconds",
        "seconds_per_slide",
        "gflops",
        "roofline_ratio",
        "head_roofline_ratio",
        "peak_rss_mb",
        "attention",
    )
    return "  ".join(
        f"{k}={e[k]:.3g}" if isinstance(e[k], float) else f"{k}={e[k]}" for k in keys if k in e
    )


# --- report -------------------------------------------------------------------------------------------
def print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    con.print(f"GEMM ceiling (fp32 4096³): [bold]{r['gemm_gflops']:.1f} GFLOP/s[/bold]")
    t = Table(
        title=f"Whole-slide inference at {GENES:,} genes (roofline: share of the GEMM measured "
        "beside it; ridge: of the run's best)"
    )
    for col in (
        "model",
        "spots",
        "attention",
        "seconds",
        "GFLOP/s",
        "roofline",
        "head roofline",
        "peak RSS MB",
    ):
        t.add_column(col, justify="right")
    ref = r["reference"]
    for name, rows in (
        ("histoprism", r["inference"]),
        ("dense (paper)", ref["dense"]["inference"]),
        ("ridge", ref["ridge"]["inference"]),
    ):
        for e in rows:
            if "error" in e:
                t.add_row(name, f"{e['spots']:,}", "", e["error"], "", "", "", "")
                continue
            head = f"{e['head_roofline_ratio']:.0%}" if "head_roofline_ratio" in e else ""
            t.add_row(
                name,
                f"{e['spots']:,}",
                e["attention"],
                f"{e['seconds']:.2f}",
                f"{e['gflops']:.1f}",
                f"{e['roofline_ratio']:.0%}",
                head,
                f"{e['peak_rss_mb']:,.0f}",
            )
    con.print(t)
    t = Table(title="Training: one slide per AdamW step, paper's shape")
    for col in ("variant", "spots", "genes", "s / slide", "s / epoch of 500", "peak RSS MB"):
        t.add_column(col, justify="right")
    tr = r["training"]
    for name, e in (
        ("histoprism (attn dropout 0.1)", tr),
        ("attn dropout 0", tr["without_attention_dropout"]),
        ("dense, full output + mask", ref["dense"]["training"]),
    ):
        if "error" in e:
            t.add_row(name, "", "", e["error"], "", "")
            continue
        t.add_row(
            name,
            f"{e['spots']:,}",
            f"{e['genes']:,}",
            f"{e['seconds_per_slide']:.2f}",
            f"{e['seconds_per_epoch_500_slides'] / 60:.0f} min",
            f"{e['peak_rss_mb']:,.0f}",
        )
    con.print(t)
    t = Table(title="Scaling: predict_slide -> h5ad on disk (X float16), seconds / peak RSS MB")
    t.add_column("spots", justify="right")
    models = (
        ("histoprism", r["scaling"]),
        ("dense (paper)", ref["dense"]["scaling"]),
        ("ridge", ref["ridge"]["scaling"]),
    )
    for name, _ in models:
        t.add_column(name, justify="right")
    spots = sorted({e["spots"] for _, rows in models for e in rows})
    for n in spots:
        cells = []
        for _, rows in models:
            e = next((x for x in rows if x["spots"] == n), None)
            if e is None:
                cells.append("")
            elif "error" in e:
                cells.append(e["error"])
            else:
                att = f" ({e['attention']})" if e["attention"] not in ("none",) else ""
                cells.append(f"{e['seconds']:.1f} s / {e['peak_rss_mb']:,.0f}{att}")
        t.add_row(f"{n:,}", *cells)
    con.print(t)
    if "paper_gpu_comparison" in r:
        con.print(r["paper_gpu_comparison"])
    if "pitch" in r:
        con.print("Same tissue at every pitch (2 x 2 mm, factorised output):")
        con.print(pitch_table(r["pitch"]))


def plot_scaling(r: dict, path: Path) -> None:
    """Time on log-log axes (slope 1 = linear); peak memory on linear axes, where linear growth is
    a straight line, with its least-squares fit for HistoPrism (MB per 1,000 spots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (
        ("HistoPrism (auto: dense ≤ 20k spots, local 400 µm above)", r["scaling"], "C0"),
        ("dense attention forced (paper)", r["reference"]["dense"]["scaling"], "C3"),
        ("ridge (HEST-bench)", r["reference"]["ridge"]["scaling"], "C2"),
    )
    for name, rows, colour in series:
        ok = [e for e in rows if "error" not in e]
        n = np.array([e["spots"] for e in ok])
        ax_t.plot(n, [e["seconds"] for e in ok], "o-", color=colour, label=name)
        ax_m.plot(n / 1e3, [e["peak_rss_mb"] / 1e3 for e in ok], "o-", color=colour, label=name)
    ok = [e for e in r["scaling"] if "error" not in e]
    if len(ok) >= 2:
        n, t = ok[-1]["spots"], ok[-1]["seconds"]
        guide = np.array([1e3, n])
        ax_t.plot(guide, guide * t / n, ":", color="grey", label="∝ N")
        x = np.array([e["spots"] for e in ok]) / 1e3
        slope, icpt = np.polyfit(x, [e["peak_rss_mb"] / 1e3 for e in ok], 1)
        ax_m.plot(
            x,
            icpt + slope * x,
            ":",
            color="grey",
            label=f"fit: {icpt:.2f} GB + {slope * 1e3:.0f} MB per 1k spots",
        )
    ax_t.set(xscale="log", yscale="log", xlabel="spots per slide", ylabel="seconds")
    ax_t.set_title(f"Whole-slide prediction to h5ad, {GENES:,} genes")
    ax_m.set(xlabel="thousand spots per slide", ylabel="peak RSS (GB)")
    ax_m.set_title("Peak memory of the process")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- profile -----------------------------------------------------------------------------------------
def profile(rows: int = 12) -> None:
    """torch.profiler top items of one training step (N=5,000) and one prediction (N=10,000)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from histoprism.inference.predict import predict_slide

    spec = {"kind": "train", "device": "cpu", "spots": 5_000, "steps": 2}
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        res = child_train(spec)
    print(f"training step, 5,000 spots: {res['step_seconds'][-1]:.2f} s (profiled: 2 steps)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    run, slide = make_run("histoprism"), make_slide(10_000)
    with (
        tempfile.TemporaryDirectory() as tmp,
        torch_profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        t0 = time.perf_counter()
        predict_slide(run, slide, Path(tmp) / "p.h5ad")
        print(f"predict_slide, 10,000 spots, float32: {time.perf_counter() - t0:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller slides: ~5 min on 2 cores")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tmp", default=None, help="folder for the h5ad files (default: system tmp)")
    ap.add_argument("--profile", action="store_true", help="print profiler tables and exit")
    ap.add_argument("--report", action="store_true", help="tables and plot of --out, no runs")
    ap.add_argument(
        "--visium-hd",
        action="store_true",
        help="only the whole-slide Visium HD series (factorised output), merged into --out",
    )
    ap.add_argument(
        "--pitch",
        action="store_true",
        help="only the per-pitch series (2 x 2 mm at 100, 16, 8, 2 µm), merged into --out",
    )
    ap.add_argument(
        "--pitch-variants",
        nargs="*",
        default=list(PITCH_VARIANTS),
        help="registry variants of the per-pitch series (others' entries in --out are kept)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(json.loads(args.child))
    if args.pitch:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        kept = [e for e in results.get("pitch", []) if e["variant"] not in args.pitch_variants]
        results["pitch"] = kept + per_pitch(args)
        results.setdefault("timed", TIMED)["pitch"] = TIMED_PITCH
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(pitch_table(results["pitch"]))
        return print(f"wrote the per-pitch entries into {args.out}")
    if args.visium_hd:
        results = json.loads(args.out.read_text()) if args.out.exists() else {"scaling": []}
        kept = [e for e in results.get("scaling", []) if e.get("output") != "factorised"]
        results["scaling"] = kept + visium_hd(args)
        results.setdefault("timed", TIMED)["scaling_factorised"] = TIMED_FACTORISED
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        return print(f"wrote the Visium HD entries into {args.out}")
    if args.profile:
        return profile()
    if args.report:
        results = json.loads(args.out.read_text())
        print_tables(results)
        return plot_scaling(results, args.plot)
    t0 = time.perf_counter()
    results = benchmark(args)
    results["mode"] = "quick" if args.quick else "full"
    results["timed"] = TIMED
    results["machine"] = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        seconds=time.perf_counter() - t0,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)
    plot_scaling(results, args.plot)
    print(f"wrote {args.out} and {args.plot} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
