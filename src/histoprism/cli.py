"""``histoprism`` command line: a thin shell over the Python API (same parameter names)."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ._core.errors import InputError, first_line
from ._core.storage import OutputError, is_no_room
from .models.registry import MODEL_KINDS, VARIANTS


class _UntypedHelp:
    """typer labels the help flag "<bool>"; like every flag here it takes no value."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Group(_UntypedHelp, typer.core.TyperGroup):
    pass


class _Command(_UntypedHelp, typer.core.TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Predict spatial gene expression from H&E embeddings (HistoPrism) and score it (HVG, GPC).",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
# a flag takes no value: an empty metavar keeps the help from showing "<bool>" beside it
Flag = functools.partial(typer.Option, metavar="")
GLOBAL_FLAGS = ("--debug", "--verbose", "-v")

Data = Annotated[Path, typer.Option("--data", help="Cohort directory (layout: docs/formats.md).")]
Encoder = Annotated[str, typer.Option("--encoder", help="Embedding folder name under embeddings/.")]
Attention = Annotated[
    str | None,
    typer.Option(
        help="auto (full up to 20,000 spots, local above) | full | local | mixed (half the heads local, half full up to 20,000) | gated (every head both, blended by a learned weight per head)."
    ),
]
AttentionRadius = Annotated[
    float | None,
    typer.Option(help="Local attention radius, µm (default: the recipe's, 300 in default)."),
]
Split = Annotated[
    Path | None, typer.Option("--split", help="Folder with {train,val,test}_split.csv.")
]


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, Flag("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, Flag("--verbose", "-v", help="Log more.")] = False,
) -> None:
    ctx.obj = {"debug": debug}  # read back by _run: no module-level state
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _run(ctx: typer.Context, fn, *args, **kwargs):
    """Call the API; bad input becomes one line on stderr and exit code 2 (traceback with --debug)."""
    try:
        return fn(*args, **kwargs)
    except OutputError as exc:
        if (ctx.obj or {}).get("debug"):
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        # HDF5 cannot recover from a failed write: freeing its objects at interpreter exit
        # prints tracebacks and may segfault. Partial files are already removed; leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    except (
        InputError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        if (ctx.obj or {}).get("debug"):
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # a bug or an unforeseen input: still one line, details with --debug
        if (ctx.obj or {}).get("debug"):
            raise
        if is_no_room(exc):  # a write outside ``storage.writing``: same line, same exit
            where = getattr(exc, "filename", None) or "output"
            err.print(f"[red]error:[/red] {where}: no room to write (disk full or file-size limit)")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        err.print(
            f"[red]error:[/red] {type(exc).__name__}: {first_line(exc)} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; outputs written so far are complete, partial files removed")
        raise typer.Exit(130) from None


@app.command(cls=_Command)
def train(
    ctx: typer.Context,
    data: Data,
    encoder: Encoder,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    split: Split = None,
    model: Annotated[str, typer.Option(help=" | ".join(MODEL_KINDS))] = "histoprism",
    epochs: Annotated[
        int | None,
        typer.Option(help="Maximum epochs (default: recipe's; with --init: fine-tuning, 0)."),
    ] = None,
    no_conditioning: Annotated[
        bool, Flag("--no-conditioning", help="Ablation: no cancer-type conditioning.")
    ] = False,
    positional_encoding: Annotated[
        bool,
        Flag("--positional-encoding", help="Sinusoidal encoding of spot centres (µm)."),
    ] = False,
    genes: Annotated[
        Path | None,
        typer.Option(
            help="Gene panel file (one gene per line); default: genes of the training slides."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[
        str, typer.Option(help="Preset (default | paper) or YAML/JSON file.")
    ] = "default",
    resume: Annotated[bool, Flag("--resume", help="Continue from OUT/last.")] = False,
    attention: Attention = None,
    attention_radius_um: AttentionRadius = None,
    crop_spots: Annotated[
        int | None,
        typer.Option(help="Train on random discs of at most this many spots (0: whole slides)."),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Pretrained HistoPrism run: keep its trunk, fit a head for --genes (small "
            "panels, minutes on a CPU).",
        ),
    ] = None,
    prompt: Annotated[
        bool,
        Flag(
            "--prompt",
            help="With --init: keep the run unchanged and fit a head that corrects it with "
            "measured spots (predict --prompt-fraction).",
        ),
    ] = False,
) -> None:
    """Train a model on the cohort's train split (early stopping on val); with --init, adapt a
    pretrained HistoPrism run to the panel --genes."""
    from .training import api

    t0 = time.perf_counter()
    run = _run(
        ctx,
        api.train,
        data,
        encoder,
        out,
        split=split,
        model=model,
        epochs=epochs,
        conditioning=not no_conditioning,
        positional_encoding=positional_encoding,
        genes=genes,
        seed=seed,
        config=config,
        resume=resume,
        attention=attention,
        attention_radius_um=attention_radius_um,
        crop_spots=crop_spots,
        init=init,
        prompt=prompt,
    )
    from ._core.distributed import torchrun_env

    if torchrun_env()[0] != 0:  # under torchrun, one summary from rank 0
        return
    from .io.rundir import load_run

    cfg, _ = load_run(run)
    best = (
        f", best epoch {cfg['best_epoch']} (val loss {cfg['best_val_loss']:.4f})"
        if "best_epoch" in cfg
        else ""
    )
    if "adapt" in cfg:
        best = f", head refitted from {init} (val r {cfg['adapt']['val_pearson']:.3f})"
    if "prompt" in cfg:
        p = cfg["prompt"]
        best = (
            f", prompt head on {init} (unmeasured val r {p['val_pearson_unmeasured']:.3f}, "
            f"image only {p['val_pearson_image_only']:.3f})"
        )
    health = cfg.get("health")
    if health and health.get("val_pearson_checked") is not None:
        verdict = "BELOW" if health["below_ridge"] else "above"
        best += (
            f", val r {health['val_pearson_checked']:.3f} {verdict} the per-spot ridge's "
            f"{health['ridge_val_pearson']:.3f}"
        )
    typer.echo(
        f"trained {model} on {len(cfg['train_slides'])} slides, {len(cfg['genes'])} genes{best} -> {run} [{time.perf_counter() - t0:.0f}s]"
    )


@app.command(cls=_Command)
def predict(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="Run directory written by train (with --uncertainty ensemble: a folder of run "
            "directories trained with different --seed).",
        ),
    ],
    data: Data,
    encoder: Encoder,
    out: Annotated[Path, typer.Option("--out", help="Folder for PRED/{id}.h5ad.")],
    split: Split = None,
    samples: Annotated[str, typer.Option(help="test | all | ID,ID,...")] = "test",
    unknown_cancer: Annotated[
        bool,
        Flag(
            "--unknown-cancer",
            help="Predict cancer codes the model never saw with its 'Unknown' token instead of failing.",
        ),
    ] = False,
    float16: Annotated[
        bool, Flag("--float16", help="Store predictions as float16 (half the disk).")
    ] = False,
    attention: Attention = None,
    attention_radius_um: AttentionRadius = None,
    no_images: Annotated[
        bool,
        Flag("--no-images", help="Leave the slide image out of uns['spatial'] (smaller files)."),
    ] = False,
    output: Annotated[
        str,
        typer.Option(
            help="dense (X) | factorised (hidden layer + head; any gene on read) | auto "
            "(factorised above 4 GiB of X, e.g. Visium HD)."
        ),
    ] = "auto",
    cancer: Annotated[
        str | None,
        typer.Option(
            help="Condition every slide on this cancer code instead of its own, or 'auto': the "
            "known type the run's classifier infers from the slide's embeddings."
        ),
    ] = None,
    uncertainty: Annotated[
        str | None,
        typer.Option(
            help="ensemble | mc-dropout: add layers sd, q025/q10/q90/q975 and "
            "obsm['pathways_sd'] (dense output only). ensemble: --model is a folder of runs."
        ),
    ] = None,
    members: Annotated[
        int | None, typer.Option(help="ensemble: use the first K runs of the --model folder.")
    ] = None,
    passes: Annotated[int, typer.Option(help="mc-dropout forward passes.")] = 20,
    uncertainty_seed: Annotated[int, typer.Option(help="Seed of the mc-dropout passes.")] = 0,
    prompt_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of each slide's spots whose measured counts correct the others "
            "(a run fitted with train --prompt); obs['prompt'] marks them."
        ),
    ] = None,
    prompt_seed: Annotated[int, typer.Option(help="Seed of the measured spots drawn.")] = 0,
) -> None:
    """Predict whole slides as AnnData (X = log1p expression, obsm['pathways'])."""
    from .inference import predict as api

    t0 = time.perf_counter()
    paths = _run(
        ctx,
        api.predict,
        model,
        data,
        encoder,
        out,
        split=split,
        samples=samples,
        unknown_cancer=unknown_cancer,
        dtype="float16" if float16 else "float32",
        attention=attention,
        attention_radius_um=attention_radius_um,
        images=not no_images,
        output=output,
        cancer=cancer,
        uncertainty=uncertainty,
        members=members,
        passes=passes,
        seed=uncertainty_seed,
        prompt_fraction=prompt_fraction,
        prompt_seed=prompt_seed,
    )
    from ._core.distributed import torchrun_env

    rank, world, _ = torchrun_env()
    share = f" (rank {rank} of {world})" if world > 1 else ""
    typer.echo(f"predicted {len(paths)} slides{share} -> {out} [{time.perf_counter() - t0:.0f}s]")


@app.command(cls=_Command)
def evaluate(
    ctx: typer.Context,
    pred: Annotated[Path, typer.Option("--pred", help="Folder of PRED/{id}.h5ad.")],
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, CSVs, report.html.")],
    split: Split = None,
    hvg: Annotated[
        str, typer.Option(help="train | bench | FILE (JSON or one gene per line).")
    ] = "train",
    genesets: Annotated[
        list[str] | None,
        typer.Option("--genesets", help="gpc (bundled Hallmark + GO) or FILE.gmt; repeatable."),
    ] = None,
    samples: Annotated[
        str | None,
        typer.Option(
            help="Instead of the test split: all (every predicted slide), a split, or ids A,B."
        ),
    ] = None,
) -> None:
    """Score predictions against measured counts: HVG-50, GPC, all genes, pooled Pearson."""
    from . import verbs

    m = _run(
        ctx, verbs.evaluate, pred, data, out, split=split, hvg=hvg, genesets=genesets,
        samples=samples,
    )  # fmt: skip
    # only what was scored: every collection evaluated (metrics.json "gene_sets", in --genesets
    # order) gets its GPC number, named after it; a collection without a score says n/a
    h = {k: _score(v) for k, v in m["headline"].items()}
    labels = {"hallmark": "Hallmark", "go": "GO"}  # the bundled two; a GMT keeps its file stem
    gpc = [f"{labels.get(c, c)} {h.get(f'gpc_{c}_micro', 'n/a')}" for c in m.get("gene_sets", {})]
    typer.echo(
        f"{m['n_slides']} slides: HVG-50 {h.get('hvg_micro', 'n/a')} "
        f"(macro {h.get('hvg_macro', 'n/a')}), "
        + (f"GPC {', '.join(gpc)}, " if gpc else "")
        + f"all genes {h.get('all_genes_micro', 'n/a')} -> {out}"
    )


def _score(value) -> str:
    """A headline number to three decimals; 'n/a' where nothing could be scored (null)."""
    return "n/a" if value is None else f"{value:.3f}"


@app.command(cls=_Command)
def benchmark(
    ctx: typer.Context,
    data: Data,
    encoder: Encoder,
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for runs, predictions, evaluations and the comparison."),
    ],
    split: Split = None,
    models: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated subset of: {', '.join(VARIANTS)}."),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="'split': one split (--split or the cohort's); 'paper': the paper's split_0 and split_1 with HEST-bench HVG lists; 'loco': leave one cancer type out of training, for every type."
        ),
    ] = "split",
    hvg: Annotated[
        str, typer.Option(help="HVG lists for --protocol split: train | bench | FILE.")
    ] = "train",
    epochs: Annotated[int | None, typer.Option(help="Cap training epochs of every model.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train, predict and evaluate every model on the same split; write comparison.md/.csv/.json
    (bootstrap CIs, sign tests, win rates, time and memory) and report.html."""
    from . import verbs

    t0 = time.perf_counter()
    paths = _run(
        ctx, verbs.benchmark, data, encoder, out, protocol=protocol, split=split, models=models,
        hvg=hvg, epochs=epochs, seed=seed,
    )  # fmt: skip
    if protocol == "loco":
        from .workflows.loco import summary

        _print_table(
            summary(paths["table"]), title="leave one cancer out: mean over held-out types"
        )
    typer.echo(f"benchmark finished in {time.perf_counter() - t0:.0f}s -> {paths['md']}")


@app.command(cls=_Command)
def report(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(
            help="An EVAL folder (metrics.json) or a benchmark folder (comparison.json)."
        ),
    ],
) -> None:
    """Regenerate report.html of an evaluation or a benchmark folder."""
    from .plotting.report import regenerate

    typer.echo(f"wrote {_run(ctx, regenerate, path)}")


@app.command(cls=_Command)
def extract(
    ctx: typer.Context,
    data: Data,
    encoder: Annotated[
        str,
        typer.Option(
            "--encoder",
            help="uni | uni2-h | conch-v1.5 | gigapath | virchow2 | h-optimus-0 | phikon-v2 | "
            "resnet50 | stain-texture (built in, no weights).",
        ),
    ],
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local weight file (.safetensors, .bin, .pth).")
    ] = None,
    allow_download: Annotated[
        bool,
        Flag("--allow-download", help="Fetch weights from the Hugging Face hub if needed."),
    ] = False,
    samples: Annotated[str, typer.Option(help="all, or comma-separated sample ids.")] = "all",
    source: Annotated[
        str, typer.Option(help="auto (patches/{id}.h5 if present, else the image) | patches | wsi.")
    ] = "auto",
    mpp: Annotated[
        float | None,
        typer.Option("--mpp", help="µm per level-0 pixel of the images (beats metadata and tags)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Patches per encoder call.")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    overwrite: Annotated[
        bool, Flag("--overwrite", help="Redo slides that already have embeddings.")
    ] = False,
) -> None:
    """Embed the spots of every slide (HEST patches, or patches cut from the whole-slide image at
    the encoder's µm/px) -> embeddings/{ENCODER}/{id}.h5. Finished slides are skipped; under
    torchrun each rank takes its share of slides."""
    from .images.extract import extract as api

    t0 = time.perf_counter()
    records = _run(
        ctx, api, data, encoder, weights=weights, allow_download=allow_download, samples=samples,
        source=source, mpp=mpp, batch_size=batch_size, device=device, overwrite=overwrite,
    )  # fmt: skip
    done = [r for r in records if r.source != "skipped"]
    spots = sum(r.n_spots for r in done)
    typer.echo(
        f"extracted {len(done)} slides ({spots} spots; {len(records) - len(done)} already done) "
        f"with {encoder} -> {data}/embeddings/{encoder}/ [{time.perf_counter() - t0:.0f}s]"
    )


@app.command("import", cls=_Command)
def import_sample(
    ctx: typer.Context,
    fmt: Annotated[
        str, typer.Option("--format", help="hest (a HEST h5ad) | spaceranger | visium-hd (outs/).")
    ],
    src: Annotated[
        Path, typer.Option("--src", help="Space Ranger outs/ folder, or the HEST sample h5ad.")
    ],
    data: Data,
    sample_id: Annotated[str, typer.Option("--id", help="Sample id: st/{ID}.h5ad, metadata row.")],
    oncotree_code: Annotated[
        str | None, typer.Option("--oncotree-code", help="Cancer code for the metadata row.")
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Whole-slide image; recorded as wsi_path.")
    ] = None,
    bin_um: Annotated[int, typer.Option("--bin-um", help="Visium HD bin size: 2, 8 or 16 µm.")] = 8,
) -> None:
    """Import one sample (Space Ranger / Visium HD outs, or HEST h5ad) into a cohort directory:
    writes st/{ID}.h5ad (raw counts, HEST format) and its metadata.csv row."""
    from .io import importer as api

    t0 = time.perf_counter()
    path = _run(
        ctx,
        api.import_sample,
        fmt,
        src,
        data,
        sample_id,
        oncotree_code=oncotree_code,
        image=image,
        bin_um=bin_um,
    )
    from .io.readers.st import read_h5ad

    adata = _run(ctx, read_h5ad, path, backed="r")
    n_obs, n_vars = adata.n_obs, adata.n_vars
    adata.file.close()
    typer.echo(
        f"imported {sample_id} ({fmt}): {n_obs} spots, {n_vars} genes -> {path} [{time.perf_counter() - t0:.0f}s]"
    )


@app.command(cls=_Command)
def export(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", help="Output format: spatialdata.")],
    pred: Annotated[Path, typer.Option("--pred", help="Folder of PRED/{id}.h5ad.")],
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="Folder for OUT/{id}.zarr.")],
    samples: Annotated[str, typer.Option(help="all | test | train | val | ID,ID,...")] = "all",
    genes: Annotated[
        str | None,
        typer.Option(help="Comma-separated genes of the predicted table (default: all)."),
    ] = None,
    max_image_px: Annotated[
        int, typer.Option(help="Longest side of the image's finest level (>= 512).")
    ] = 20_000,
) -> None:
    """Write predictions, the slide image and the measured counts as SpatialData stores."""
    t0 = time.perf_counter()
    if fmt != "spatialdata":
        _run(ctx, _bad, f"unknown --format '{fmt}' (spatialdata)")
    from .integrations.spatialdata import export_spatialdata

    names = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
    paths = _run(
        ctx, export_spatialdata, pred, data, out, samples=samples, genes=names,
        max_image_px=max_image_px,
    )  # fmt: skip
    typer.echo(
        f"exported {len(paths)} slides as SpatialData -> {out}/ [{time.perf_counter() - t0:.0f}s]"
    )


@app.command("import-checkpoint", cls=_Command)
def import_checkpoint(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="The authors' log directory (config.yml, ckpt/best_model.pt), or the published "
            "model: hub:HuSusu/HistoPrism (hub:HuSusu/HistoPrism@REVISION for a revision).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write (new or empty).")],
    encoder: Annotated[
        str | None, typer.Option(help="Embedding folder the run expects (default: config.yml).")
    ] = None,
    split: Annotated[
        int, typer.Option(help="hub: the paper run trained on split 0 or 1.", min=0, max=1)
    ] = 0,
    file: Annotated[
        str | None,
        typer.Option("--file", help="hub: the weights file (default HistoPrism_split{N}.ckpt)."),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="hub: a local copy of the weights file, used instead of the hub."),
    ] = None,
    allow_download: Annotated[
        bool, Flag("--allow-download", help="hub: fetch the weights if not in the hub cache.")
    ] = False,
) -> None:
    """Import a checkpoint of the authors' HistoPrism code, or their published pan-cancer model,
    as a run directory for predict, evaluate and benchmark."""
    t0 = time.perf_counter()
    if source.startswith("hub:"):
        from .integrations.published import import_published

        if encoder is not None:
            _run(ctx, _bad, "--encoder is for a log directory: the published model takes uni")
        s = _run(
            ctx, import_published, source, out, split=split, file=file, weights=weights,
            allow_download=allow_download,
        )  # fmt: skip
        w = s["source"]
        origin = f"{w['repo']}/{w['filename']} (sha256 {w['sha256'][:12]}…)"
        typer.echo(f"licence of the weights: {s['licence']} ({s['licence_source']})")
    else:
        from .integrations.authors import import_checkpoint as import_log_dir

        for flag, given in (("--file", file), ("--weights", weights), ("--split", split != 0)):
            if given:
                _run(ctx, _bad, f"{flag} is for hub: references, not a log directory")
        if allow_download:
            _run(ctx, _bad, "--allow-download is for hub: references, not a log directory")
        s = _run(ctx, import_log_dir, Path(source), out, encoder=encoder)
        origin = source
    skipped = f"; {len(s['ignored'])} unused weights skipped" if s["ignored"] else ""
    typer.echo(
        f"imported {origin} (epoch {s['epoch']}, validation loss {s['best_val_loss']}, "
        f"{s['n_parameters']:,} parameters{skipped}) -> {s['out']} "
        f"[{time.perf_counter() - t0:.0f}s]"
    )


def _bad(message: str) -> None:
    raise InputError(message)


@app.command(cls=_Command)
def demo(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the cohort, runs, predictions and table.")
    ] = Path("demo_out"),
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs of the HistoPrism models (default 25).")
    ] = None,
    from_images: Annotated[
        bool,
        Flag(
            "--from-images",
            help="Give the cohort H&E-like slide images and embed them with stain-texture first.",
        ),
    ] = False,
) -> None:
    """Built-in cohort -> train HistoPrism, its no-conditioning ablation and ridge baselines
    -> predict -> evaluate -> one table with the attainable ceiling. With --from-images:
    images -> extract (stain-texture) -> train -> predict -> evaluate."""
    from .workflows.demo import run_demo

    t0 = time.perf_counter()
    table = _run(ctx, run_demo, out, epochs=epochs, from_images=from_images)
    _print_table(table, title="histoprism demo: test slides of the built-in cohort (Pearson r)")
    typer.echo(
        f"demo finished in {time.perf_counter() - t0:.0f}s; results in {out}/results.md, reports in {out}/eval/*/report.html"
    )


@app.command(cls=_Command)
def explain(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option("--model", help="HistoPrism run directory.")],
    data: Data,
    encoder: Encoder,
    sample: Annotated[str, typer.Option("--sample", help="Sample id of the slide to explain.")],
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="A panel gene, a bundled GPC gene set name, or genes:A,B,C (a gene list).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for {id}_{target}.png and .csv.")],
    pred: Annotated[
        Path | None,
        typer.Option(
            "--pred", help="PRED folder: add obsm['attribution_<target>'] to PRED/{id}.h5ad."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Integrated-gradient steps.")] = 32,
    unknown_cancer: Annotated[
        bool,
        Flag(
            "--unknown-cancer",
            help="Use the 'Unknown' token for a cancer code the model never saw instead of failing.",
        ),
    ] = False,
) -> None:
    """Per-spot attribution of a gene or gene set on one slide: integrated gradients w.r.t. the
    embeddings, and each spot's prediction split into its own and its neighbourhood's part."""
    from .inference.explain import explain_to_files

    t0 = time.perf_counter()
    ex, paths = _run(
        ctx,
        explain_to_files,
        model,
        data,
        encoder,
        sample,
        target,
        out,
        pred=pred,
        steps=steps,
        unknown_cancer=unknown_cancer,
    )
    typer.echo(
        f"explained {ex.target.label} on {ex.sample_id}: neighbourhood share "
        f"{ex.neighbourhood_share:.2f}, attributions sum to {ex.attribution.sum():.4g} "
        f"(f(x) - f(baseline) = {ex.delta:.4g}) -> {paths[0]}"
        f"{' and ' + str(paths[-1]) if pred is not None else ''} "
        f"[{time.perf_counter() - t0:.0f}s]"
    )


def _print_table(table, *, title: str) -> None:
    """Plain pipe table: readable in a terminal of any width and in CI logs."""
    from .evaluation.compare import pipe_table

    typer.echo(f"\n{title}\n\n{pipe_table(table)}")


def hoist_global_flags(argv: list[str]) -> list[str]:
    """Move --debug / --verbose given after the subcommand to the front, where the callback
    reads them: ``histoprism train ... --debug`` works as ``histoprism --debug train ...``."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in GLOBAL_FLAGS]


def entry() -> None:  # pragma: no cover - console script
    app(args=hoist_global_flags(sys.argv[1:]), prog_name="histoprism")


if __name__ == "__main__":  # pragma: no cover - python -m histoprism.cli (torchrun)
    entry()
