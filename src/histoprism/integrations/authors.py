"""Import a checkpoint of the authors' code (github.com/susuhu/HistoPrism) as a run directory.

Their training writes ``LOG_DIR/config.yml`` and ``LOG_DIR/ckpt/best_model.pt``, a ``torch.save``
dict whose ``model_state`` is the state dict of their ``HistoPrism`` module. ``import_checkpoint``
moves those weights onto our network as the "paper" preset builds it (``training.recipes.PRESETS``), which
computes the same function, and writes an ordinary run directory: ``predict``, ``evaluate`` and
``benchmark`` use it like a trained one. The file is read with ``weights_only=True``, so loading
it runs no code.

Their keys -> ours (D embedding dim, H hidden width, C cancer codes, G genes; i a layer):

    input_proj.*                                  proj.*
    onco_embedder.weight (D, C), .bias (D,)       condition.tokens.weight (C, D) = weight.T + bias
    conditioner.attention.in_proj_* (3D rows)     condition.kv.*: rows D:3D (key, value); the query
                                                  rows cannot act on a single key and are dropped
    conditioner.attention.out_proj.*              condition.out.*
    conditioner.norm.*                            condition.norm.*
    transformer.layers.i.self_attn.in_proj_*      blocks.i.qkv.*  (same q | k | v and head layout)
    transformer.layers.i.self_attn.out_proj.*     blocks.i.out.*
    transformer.layers.i.linear1.*, linear2.*     blocks.i.ff.0.*, blocks.i.ff.3.*
    transformer.layers.i.norm1.*, norm2.*         blocks.i.norm1.*, blocks.i.norm2.*
    gene_regression_head.0.*, .1.*, .4.*          head_hidden.0.*, head_hidden.1.*, head_out.*
    img_conv.*, img_norm.*                        not used: the graph convolution runs
                                                  graph_config.n_conv_layers = 0 times and
                                                  img_norm only inside it

Genes are the bundled 38,982-gene STPath panel (their ``stpath_genes.yaml``, same order); cancer
codes the bundled ``oncotree_code_list.txt`` (their one-hot order).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from .._core.errors import InputError
from .._core.files import atomic_path
from ..expression.genes import GenePanel, data_path, stpath_panel
from ..images.encoders import ENCODERS
from ..io.rundir import save_run
from ..models.network import HistoPrism, ModelConfig
from ..training.recipes import PRESETS

log = logging.getLogger(__name__)

AUTHORS_CODE = "github.com/susuhu/HistoPrism"
CONFIG_FILE = "config.yml"
CHECKPOINT_FILE = Path("ckpt") / "best_model.pt"
# their PFM_name -> our encoder (both the CLS token of the same network); others need --encoder
ENCODER_NAMES = {
    "uni": "uni",
    "univ2": "uni2-h",
    "gigapath": "gigapath",
    "hoptimus0": "h-optimus-0",
}
UNUSED_PREFIXES = ("img_conv.", "img_norm.")  # weights of the graph convolution that never runs
STPATH_GENE_LIST = "stpath_genes.yaml"  # their name of the panel we bundle
_LAYER = re.compile(r"transformer\.layers\.(\d+)\.")
# Trained weights stay within a few units (weight decay, LayerNorm); 1e6 is far beyond any, yet
# far below what overflows float32 in a forward pass (products of ~1e19 values)
MAX_WEIGHT = 1e6
MAX_CONFIG_NODES = 100_000  # values in config.yml, YAML aliases expanded (a real one has ~50)
MAX_CONFIG_DEPTH = 50


def import_checkpoint(
    log_dir: str | Path,
    out: str | Path,
    *,
    encoder: str | None = None,
    genes: Sequence[str] | None = None,
) -> dict:
    """Convert the authors' ``LOG_DIR`` (config.yml + ckpt/best_model.pt) into the run directory
    ``out`` (must not exist, or be empty); return a summary.

    ``encoder``: the embedding folder name the run will expect (default: config.yml's PFM_name,
    e.g. uni). ``genes``: the output genes in head order, for a checkpoint not trained on the
    bundled panel. Summary keys: out, epoch, best_val_loss, n_parameters (counted as the authors
    count, ``authors_parameter_count``), ignored (their unused keys), genes (count), cancers,
    encoder.
    """
    log_dir = Path(log_dir)
    config_path, ckpt_path = log_dir / CONFIG_FILE, log_dir / CHECKPOINT_FILE
    settings = read_config(config_path)
    imported = dict(source=AUTHORS_CODE, log_dir=str(log_dir.resolve()))
    return convert(settings, ckpt_path, out, config_path=config_path, encoder=encoder, genes=genes,
                   imported=imported)  # fmt: skip


def convert(
    settings: dict,
    ckpt_path: Path,
    out: str | Path,
    *,
    config_path: Path,
    encoder: str | None = None,
    genes: Sequence[str] | None = None,
    imported: dict | None = None,
) -> dict:
    """The authors' checkpoint ``ckpt_path`` with its training ``settings`` (their config.yml,
    read from ``config_path``, named in errors) as the run directory ``out``; the summary of
    ``import_checkpoint``. ``imported``: where it came from, kept in config.json ``imported``."""
    out = Path(out)
    ckpt = read_checkpoint(ckpt_path)
    state, ignored = _split_unused(ckpt["model_state"])
    panel = GenePanel(tuple(genes if genes is not None else _bundled_panel(settings, config_path)))
    cancers = cancer_codes()
    cfg = model_config(
        state, settings, n_genes=len(panel), n_cancers=len(cancers), paths=(ckpt_path, config_path)
    )
    _check_shapes(state, expected_shapes(cfg), ckpt_path)
    encoder = _encoder(encoder, settings, cfg.in_dim, config_path)
    model = HistoPrism(cfg)
    model.load_state_dict(our_state(state, cfg))  # strict: every weight of ours is filled
    run_config = dict(
        model="histoprism",
        model_config=cfg.to_dict(),
        encoder=encoder,
        in_dim=cfg.in_dim,
        genes=list(panel.genes),
        cancers=cancers,
        best_epoch=_number(ckpt.get("epoch"), int),  # their count of epochs run, as ours
        best_val_loss=_number(ckpt.get("best_val_loss"), float),  # theirs: not our masked loss
        imported=dict(
            **(imported or {}),
            ignored=ignored,
            authors_config=json.loads(json.dumps(settings, default=str)),  # YAML dates etc.
        ),
    )
    _write_run(out, run_config, model.state_dict())
    summary = dict(
        out=str(out),
        epoch=run_config["best_epoch"],
        best_val_loss=run_config["best_val_loss"],
        n_parameters=authors_parameter_count(model),
        ignored=ignored,
        genes=len(panel),
        cancers=cancers,
        encoder=encoder,
    )
    log.info("imported %s -> %s (%d parameters)", ckpt_path, out, summary["n_parameters"])
    return summary


# --- reading their files ---------------------------------------------------------------------
def read_config(path: Path) -> dict:
    """config.yml as a dict."""
    if not path.is_file():
        raise InputError("file not found (the authors' run directory has config.yml)", path)
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc})", path) from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"not valid YAML: {first}", path) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise InputError("not a training config: nested too deep", path) from None
    if not isinstance(settings, dict):
        raise InputError("not a training config (a YAML mapping)", path)
    _check_size(settings, path)
    return settings


def _check_size(settings: dict, path: Path) -> None:
    """Refuse a config that expands to more than MAX_CONFIG_NODES values or nests deeper than
    MAX_CONFIG_DEPTH: YAML aliases share one object many times over (a few lines can stand for
    10**9 values), and the import copies the config into config.json, which expands them."""
    stack, seen = [(settings, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES or depth > MAX_CONFIG_DEPTH:
            raise InputError(
                f"not a training config: more than {MAX_CONFIG_NODES:,} values or "
                f"{MAX_CONFIG_DEPTH} levels (YAML aliases expanded)",
                path,
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


def read_checkpoint(path: Path) -> dict:
    """best_model.pt as a dict with a ``model_state`` dict of tensors; nothing in it is run."""
    if not path.is_file():
        raise InputError("file not found (the authors' run directory has ckpt/best_model.pt)", path)
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # weights_only refusals, truncation, not a zip: many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read as a torch checkpoint: {first}", path) from None
    state = ckpt.get("model_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InputError("not an authors' checkpoint: no 'model_state' dict", path)
    bad = next((k for k in state if not isinstance(k, str)), None)
    if bad is not None:
        raise InputError(f"model_state has a key {bad!r} that is not a name", path)
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise InputError(f"model_state['{bad}'] is not a tensor", path)
    for key, value in state.items():
        if key.removeprefix("module.").startswith(UNUSED_PREFIXES):
            continue
        if not value.is_floating_point():
            raise InputError(f"weight '{key}' is {value.dtype}, not floating point", path)
        if not torch.isfinite(value).all():
            raise InputError(f"weight '{key}' holds NaN or infinite values", path)
        if value.numel() and value.abs().max() > MAX_WEIGHT:
            raise InputError(
                f"weight '{key}' holds values beyond ±{MAX_WEIGHT:g}: not a trained network's",
                path,
            )
    return ckpt


def _split_unused(state: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop a ``module.`` prefix (a checkpoint saved from a DataParallel/DDP wrapper) and set the
    never-run graph-convolution weights aside: (weights used, sorted names of those ignored)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    ignored = sorted(k for k in state if k.startswith(UNUSED_PREFIXES))
    used = {k: v.float() for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    return used, ignored


def _bundled_panel(settings: dict, config_path: Path) -> list[str]:
    """The bundled STPath panel, if config.yml trained on it (or does not say)."""
    paths = settings.get("paths_config") or {}
    listed = paths.get("gene_list_path") if isinstance(paths, dict) else None
    if listed and Path(str(listed)).name != STPATH_GENE_LIST:
        raise InputError(
            f"paths_config.gene_list_path is {listed}, not the bundled {STPATH_GENE_LIST}: "
            "pass that panel's genes in head order (genes=)",
            config_path,
        )
    return stpath_panel()


def cancer_codes() -> list[str]:
    """Their one-hot order: the bundled split's oncotree_code_list.txt (29 codes)."""
    path = data_path("splits", "split_0", "oncotree_code_list.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# --- their network's shape -> our config -----------------------------------------------------
def model_config(
    state: dict[str, torch.Tensor],
    settings: dict,
    *,
    n_genes: int,
    n_cancers: int,
    paths: tuple[Path, Path],
) -> ModelConfig:
    """The "paper" preset at the checkpoint's sizes (weights) and head counts (config.yml: the
    weights do not tell them; defaults as their code's). ``paths``: (checkpoint, config.yml)."""
    ckpt_path, config_path = paths
    graph = settings.get("graph_config") or {}
    if not isinstance(graph, dict):
        raise InputError(f"graph_config is {graph!r}, not a mapping", config_path)
    if graph.get("n_conv_layers") or 0:
        raise InputError(
            f"graph_config.n_conv_layers is {graph['n_conv_layers']}: a graph convolution "
            "runs in this model, which histoprism does not implement",
            config_path,
        )
    conditioned = bool(settings.get("onco_onehot_dim"))
    strategy = str(settings.get("conditioning_strategy")).lower()
    if conditioned and strategy != "cross_attention":
        raise InputError(
            f"conditioning_strategy is {strategy}, only cross_attention exists", config_path
        )
    hidden, in_dim = _shape(state, "input_proj.weight", 2, ckpt_path)
    ff = _shape(state, "transformer.layers.0.linear1.weight", 2, ckpt_path)[0]
    n_layers = len({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    heads = _heads(settings, "transformer_heads", hidden, config_path)
    cross = _heads(settings, "cross_attn_heads", in_dim, config_path) if conditioned else 2
    if min(hidden, in_dim, ff) < 1:
        raise InputError(
            f"input_proj.weight {hidden} x {in_dim}, linear1 width {ff}: empty layers", ckpt_path
        )
    if ff % hidden:
        raise InputError(
            f"transformer.layers.0.linear1.weight: width {ff} is not a multiple of {hidden}",
            ckpt_path,
        )
    dropout = settings.get("dropout_rate", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise InputError(f"dropout_rate {dropout!r} is not a probability in [0, 1)", config_path)
    return ModelConfig(
        **{
            **PRESETS["paper"][0],
            **dict(
                in_dim=in_dim,
                n_genes=n_genes,
                n_conditions=n_cancers,
                hidden=hidden,
                n_layers=n_layers,
                n_heads=heads,
                cross_heads=cross,
                ff_mult=ff // hidden,
                dropout=dropout,
                attn_dropout=dropout,
                conditioning=conditioned,
            ),
        }
    )


def _shape(state: dict, key: str, ndim: int, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise InputError(f"missing weight '{key}'", path)
    if state[key].dim() != ndim:
        raise InputError(f"weight '{key}' has shape {tuple(state[key].shape)}", path)
    return tuple(state[key].shape)


def _heads(settings: dict, key: str, width: int, config_path: Path) -> int:
    heads = settings.get(key) or 2  # their code's default
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or width % heads:
        raise InputError(f"{key}: {heads} heads do not divide the width {width}", config_path)
    return heads


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of their state dict that we use, with its shape."""
    d, h, g, f = cfg.in_dim, cfg.hidden, cfg.n_genes, cfg.ff_mult * cfg.hidden
    shapes = {"input_proj.weight": (h, d), "input_proj.bias": (h,)}
    if cfg.conditioning:
        shapes |= {
            "onco_embedder.weight": (d, cfg.n_conditions),
            "onco_embedder.bias": (d,),
            "conditioner.attention.in_proj_weight": (3 * d, d),
            "conditioner.attention.in_proj_bias": (3 * d,),
            "conditioner.attention.out_proj.weight": (d, d),
            "conditioner.attention.out_proj.bias": (d,),
            "conditioner.norm.weight": (d,),
            "conditioner.norm.bias": (d,),
        }
    for i in range(cfg.n_layers):
        p = f"transformer.layers.{i}."
        shapes |= {
            p + "self_attn.in_proj_weight": (3 * h, h),
            p + "self_attn.in_proj_bias": (3 * h,),
            p + "self_attn.out_proj.weight": (h, h),
            p + "self_attn.out_proj.bias": (h,),
            p + "linear1.weight": (f, h),
            p + "linear1.bias": (f,),
            p + "linear2.weight": (h, f),
            p + "linear2.bias": (h,),
            **{p + f"norm{n}.{w}": (h,) for n in (1, 2) for w in ("weight", "bias")},
        }
    return shapes | {
        "gene_regression_head.0.weight": (h, h),
        "gene_regression_head.0.bias": (h,),
        "gene_regression_head.1.weight": (h,),
        "gene_regression_head.1.bias": (h,),
        "gene_regression_head.4.weight": (g, h),
        "gene_regression_head.4.bias": (g,),
    }


def _check_shapes(state: dict, expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """One line naming the first missing, unexpected or misshapen key."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"missing weight '{missing[0]}'{_more(missing)}", path)
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise InputError(f"unexpected weight '{unexpected[0]}'{_more(unexpected)}", path)
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            why = " (the gene panel's size)" if key.startswith("gene_regression_head.4.") else ""
            raise InputError(
                f"weight '{key}' has shape {tuple(state[key].shape)}, expected {shape}{why}", path
            )


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _encoder(encoder: str | None, settings: dict, in_dim: int, config_path: Path) -> str:
    """The given name, else config.yml's PFM_name in our registry; its dimension must fit."""
    path = None if encoder is not None else config_path
    if encoder is None:
        pfm = settings.get("PFM_name")
        if pfm not in ENCODER_NAMES:
            raise InputError(
                f"PFM_name {pfm!r} names no histoprism encoder: pass the encoder (--encoder)",
                config_path,
            )
        encoder = ENCODER_NAMES[pfm]
    known = ENCODERS.get(encoder)
    if known is not None and known.dim != in_dim:
        raise InputError(
            f"encoder '{encoder}' gives {known.dim}-d embeddings, the checkpoint takes {in_dim}-d "
            "(input_proj.weight)",
            path,
        )
    return encoder


# --- weights ---------------------------------------------------------------------------------
def our_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Their (checked) weights -> our state dict, buffers included."""
    d = cfg.in_dim
    ours = {
        "feature_mean": torch.zeros(d),  # the paper feeds raw embeddings
        "feature_std": torch.ones(d),
        "proj.weight": state["input_proj.weight"],
        "proj.bias": state["input_proj.bias"],
    }
    if cfg.conditioning:
        attn = "conditioner.attention."
        # one-hot row c through Linear(C -> D) = column c of the weight + the bias
        emb_w, emb_b = state["onco_embedder.weight"], state["onco_embedder.bias"]
        ours |= {
            "condition.tokens.weight": emb_w.T + emb_b,
            "condition.kv.weight": state[attn + "in_proj_weight"][d:],  # key and value rows
            "condition.kv.bias": state[attn + "in_proj_bias"][d:],
            "condition.out.weight": state[attn + "out_proj.weight"],
            "condition.out.bias": state[attn + "out_proj.bias"],
            "condition.norm.weight": state["conditioner.norm.weight"],
            "condition.norm.bias": state["conditioner.norm.bias"],
        }
    names = {
        "self_attn.in_proj_weight": "qkv.weight",
        "self_attn.in_proj_bias": "qkv.bias",
        "self_attn.out_proj.weight": "out.weight",
        "self_attn.out_proj.bias": "out.bias",
        "linear1.weight": "ff.0.weight",
        "linear1.bias": "ff.0.bias",
        "linear2.weight": "ff.3.weight",
        "linear2.bias": "ff.3.bias",
        **{f"norm{n}.{w}": f"norm{n}.{w}" for n in (1, 2) for w in ("weight", "bias")},
    }
    for i in range(cfg.n_layers):
        ours |= {f"blocks.{i}.{o}": state[f"transformer.layers.{i}.{t}"] for t, o in names.items()}
    head = {"0": "head_hidden.0", "1": "head_hidden.1", "4": "head_out"}
    for t, o in head.items():
        for w in ("weight", "bias"):
            ours[f"{o}.{w}"] = state[f"gene_regression_head.{t}.{w}"]
    return {k: v.contiguous() for k, v in ours.items()}


def authors_parameter_count(model: HistoPrism) -> int:
    """Parameters of the authors' network that ``model`` computes, as they count them (every
    parameter of their module) less the graph convolution (``img_conv``) that their released
    configuration never runs: 17,210,438 at UNI size (1,024-d), 38,982 genes, 29 cancer codes.

    Ours has D² + 4D fewer (``network.CancerConditioning``): their cross-attention's query
    projection (D² + D, dead with one key), the bias of their one-hot Linear (D, folded into our
    embedding rows) and ``img_norm`` (2D, applied only inside the graph convolution).
    """
    cfg = model.cfg
    if cfg.conditioning and (cfg.conditioning_site != "input" or cfg.context_tokens != 1):
        raise ValueError("the authors' network conditions at the input with one token")
    d = cfg.in_dim
    extra = 2 * d + ((d * d + d) + d if cfg.conditioning else 0)
    return sum(p.numel() for p in model.parameters()) + extra


# --- writing -----------------------------------------------------------------------------------
def _number(value, kind):
    """A plain int/float for JSON (a 0-d tensor or None as saved); None for anything else (the
    epoch and loss are for the record: a checkpoint with odd ones still has usable weights)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = kind(value)
    except (OverflowError, ValueError):  # int(NaN), int(inf), an int beyond any float
        return None
    return number if math.isfinite(number) else None


def _write_run(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the run directory under a temporary name, renamed onto ``out`` when complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("already exists: import into a new directory", out)
    with atomic_path(out) as tmp:
        save_run(tmp, config=config, tensors=tensors)
