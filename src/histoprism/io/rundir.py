"""Run directories: weights as safetensors, everything else as JSON. No pickle anywhere.

A run describes itself (model kind and config, gene panel, cancer vocabulary, encoder name and
dim, package and format version) and refuses to load into a mismatching use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._core import keys
from .._core.errors import InputError, first_line
from .._core.files import atomic_path, write_text_atomic
from .._core.version import __version__

FORMAT_VERSION = 1


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or damaged one is an InputError naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError("weights file not found", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:  # truncated, garbage, a directory, unreadable
        raise InputError(f"cannot read as safetensors ({first_line(exc)})", path) from exc


def read_json_object(path: str | Path) -> dict:
    """Read a JSON object (config.json, state.json); a damaged file is an InputError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({first_line(exc)})", path) from exc
    except RecursionError as exc:
        raise InputError("not valid JSON (nested too deeply)", path) from exc
    if not isinstance(value, dict):
        raise InputError(f"not a JSON object (its top level is a {type(value).__name__})", path)
    return value


def save_run(run_dir: str | Path, *, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (weights first: a run with a config is complete)."""
    run_dir = Path(run_dir)
    save_tensors(run_dir / keys.RUN_WEIGHTS, tensors)
    meta = {"format_version": FORMAT_VERSION, "histoprism_version": __version__, **config}
    write_text_atomic(run_dir / keys.RUN_CONFIG, json.dumps(meta, indent=1))
    return run_dir


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a run directory -> (config, tensors); an unknown format version is an error."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / keys.RUN_CONFIG
    if not cfg_path.exists():
        raise InputError("not a trained run (no config.json)", run_dir)
    config = read_json_object(cfg_path)
    if config.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"run format version {config.get('format_version')} is not {FORMAT_VERSION}", cfg_path
        )
    _check_config(config, cfg_path)
    tensors = load_tensors(run_dir / keys.RUN_WEIGHTS)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"non-finite weights in {bad[0]}", run_dir / keys.RUN_WEIGHTS)
    return config, tensors


def _check_config(config: dict, path: Path) -> None:
    """The fields every run has: a model kind, a non-empty panel and cancer vocabulary of unique
    names (a damaged config is refused here, not deep inside the model)."""
    if not isinstance(config.get("model"), str):
        raise InputError("no model kind ('model')", path)
    for field in ("genes", "cancers"):
        names = config.get(field)
        if not isinstance(names, list) or not names:
            raise InputError(f"'{field}' must be a non-empty list", path)
        if not all(isinstance(n, str) and n for n in names):
            raise InputError(f"'{field}' must hold non-empty names (text)", path)
        if len(set(names)) != len(names):
            raise InputError(f"'{field}' holds a name twice", path)


def check_encoder(config: dict, encoder: str, *, run_dir: str | Path) -> None:
    """Refuse embeddings of another encoder than the run was trained on."""
    if config.get("encoder") != encoder:
        raise InputError(
            f"model was trained on '{config.get('encoder')}' embeddings, not '{encoder}'", run_dir
        )


def save_optimizer(path: str | Path, opt: torch.optim.Optimizer) -> list[dict]:
    """Write the optimiser's tensors (``{param}.{name}``) as safetensors; return its param groups
    (plain numbers, for JSON)."""
    sd = opt.state_dict()
    tensors = {
        f"{idx}.{name}": (v if isinstance(v, torch.Tensor) else torch.tensor(v))
        for idx, st in sd["state"].items()
        for name, v in st.items()
    }
    save_tensors(path, tensors)
    return sd["param_groups"]


def load_optimizer(path: str | Path, opt: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    """Restore an optimiser written by ``save_optimizer``."""
    per_param: dict[int, dict] = {}
    for key, value in load_tensors(path).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": param_groups})


def weights_notice(config: dict) -> str | None:
    """One line naming the licence of imported weights (config.json ``imported``), or None for a
    run without one."""
    imported = config.get("imported")
    if not isinstance(imported, dict) or not imported.get("licence"):
        return None
    weights = imported.get("weights") or {}
    origin = f"{weights.get('repo')}/{weights.get('filename')}" if weights else "imported weights"
    return (
        f"the weights of this run ({origin}) are published under {imported['licence']}: "
        "their terms apply to what you do with the predictions"
    )
