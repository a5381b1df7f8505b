"""Every model histoprism can train, load and compare, in one table.

``MODEL_KINDS`` maps a model name (``train --model``, ``config.json['model']``) to how it is fitted
and loaded; ``VARIANTS`` are the rows of a comparison (a kind plus the options that make an
ablation), read by ``benchmark``, the demo and ``benchmarks/``. Adding a model is one ``ModelKind``
entry whose ``fit`` and ``load`` functions follow the signatures below, and whose loaded object
follows the ``Predictor`` protocol. Functions are named as "module:function" and imported when
used, so that reading the table (CLI help) imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .._core.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from ..io.cohort import Slide


class Predictor(Protocol):
    """What prediction needs from a fitted model of any kind.

    ``prepare`` runs everything that does not depend on the output gene (the trunk, a PCA, the
    spot neighbours) once per slide; ``predict_genes`` then gives any block of panel columns.
    ``closed_form_pathways``: the model computes pathway scores from ``prepare``'s output without
    an (N, G) pass (``pathway_scores``); otherwise prediction derives them from the written genes.
    """

    closed_form_pathways: bool

    def prepare(self, slide: Slide, *, unknown_cancer: bool = False) -> Any: ...

    def predict_genes(self, prepared: Any, cols: slice) -> np.ndarray:
        """(N, len(cols)) float32 predicted log1p(counts) of panel columns ``cols``."""
        ...

    def pathway_scores(self, prepared: Any, membership: np.ndarray) -> np.ndarray:
        """(N, S) mean z-scored prediction of each set's genes; membership (G, S) 0/1."""
        ...

    def spot_columns(self, prepared: Any) -> dict[str, np.ndarray]:
        """Per-spot ``obs`` columns a prediction carries besides the genes, (N,) each (a
        prompted predictor: which spots were measured); {} for most."""
        ...

    def uns_info(self) -> dict:
        """What ``uns['histoprism']`` records of the predictor beyond its run; {} for most."""
        ...


class PredictorDefaults:
    """The optional parts of ``Predictor``, for the predictors that have none."""

    def spot_columns(self, prepared: Any) -> dict[str, np.ndarray]:
        return {}

    def uns_info(self) -> dict:
        return {}


@dataclass(frozen=True)
class FitOptions:
    """What ``train`` passes to every kind's fit function (a kind ignores what it has no use for)."""

    model: str  # the kind's name, as written to config.json
    encoder: str
    seed: int = 0
    epochs: int | None = None
    conditioning: bool = True
    positional_encoding: bool = False
    attention: str | None = None
    attention_radius_um: float | None = None
    crop_spots: int | None = None
    config: str | Any | None = "default"  # recipe: preset name or YAML/JSON path
    resume: bool = False
    progress: bool = True


@dataclass(frozen=True)
class ModelKind:
    """One trainable model.

    fit: "module:function", ``fit(data: TrainingData, out: Path, options: FitOptions, **params)
    -> Path`` writes a run directory; params: its fixed keyword arguments (the kNN of ridge-knn).
    load: "module:function", ``load(config: dict, tensors: dict[str, Tensor], *, panel, vocab,
    device, overrides: dict) -> Predictor`` rebuilds it from the run directory (``overrides``:
    prediction-time settings such as the attention mode, for the kinds that have them).
    """

    name: str
    summary: str
    fit: str
    load: str
    params: dict = field(default_factory=dict)

    def fit_function(self) -> Callable[..., Any]:
        return _resolve(self.fit)

    def load_function(self) -> Callable[..., Predictor]:
        return _resolve(self.load)


MODEL_KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind(
            "histoprism",
            "cancer-conditioned transformer over all spots of a slide (the method)",
            "histoprism.training.loop:fit_histoprism",
            "histoprism.models.run:load_histoprism",
        ),
        ModelKind(
            "ridge",
            "HEST-bench ridge on PCA(256) of each spot's embedding",
            "histoprism.training.baselines:fit_ridge",
            "histoprism.models.baselines:load_ridge",
            {"knn": 0},
        ),
        ModelKind(
            "ridge-knn",
            "ridge, then each spot blended with its 8 nearest spots",
            "histoprism.training.baselines:fit_ridge",
            "histoprism.models.baselines:load_ridge",
            {"knn": 8},
        ),
        ModelKind(
            "mlp",
            "per-spot MLP on the embedding + cancer one-hot (HistoPrism's per-spot ablation)",
            "histoprism.training.baselines:fit_mlp",
            "histoprism.models.baselines:load_mlp",
        ),
    )
}


def model_kind(name: str) -> ModelKind:
    """The registered kind ``name``; InputError naming the known ones otherwise."""
    if name not in MODEL_KINDS:
        raise InputError(f"unknown model '{name}' (have: {', '.join(MODEL_KINDS)})")
    return MODEL_KINDS[name]


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a model kind plus the ``train`` options that make an ablation.

    name: folder and table name.  label: row label for people.  options: keyword arguments of
    ``histoprism.training.api.train``.  config: recipe overrides (``{"model": {...}, "train": {...}}``)
    on top of the default recipe. compared_by_default: part of ``benchmark`` without --models.
    """

    name: str
    label: str
    kind: str
    options: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    compared_by_default: bool = True  # False: a comparison runs it only when named

    def train_options(self) -> dict:
        """Keyword arguments of ``histoprism.training.api.train`` for this row."""
        return dict(
            model=self.kind, **self.options, **({"config": self.config} if self.config else {})
        )

    def cli_flags(self) -> list[str]:
        """``histoprism train`` flags for ``kind`` and ``options`` (``config`` goes in a file)."""
        flags = ["--model", self.kind]
        for key, value in self.options.items():
            if key == "conditioning" and value is False:
                flags.append("--no-conditioning")
            elif key == "positional_encoding" and value is True:
                flags.append("--positional-encoding")
            else:
                flags += [f"--{key.replace('_', '-')}", str(value)]
        return flags


# the default's spatial context before the rings: the mean of each spot's 6 nearest spots, dense
# attention up to 20,000 spots (local within 400 µm above); no input dropout, as then
_NEIGHBOUR_MEAN = {
    "neighbours": 6,
    "context_rings_um": [],
    "site_um": 0.0,
    "attention": "auto",
    "attention_radius_um": 400.0,
    "input_dropout": 0.0,
}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("histoprism", "HistoPrism", "histoprism"),
        Variant(
            "no-conditioning",
            "HistoPrism, no conditioning",
            "histoprism",
            {"conditioning": False},
        ),
        Variant(
            "positional-encoding",
            "HistoPrism + positional encoding",
            "histoprism",
            {"positional_encoding": True},
        ),
        Variant(
            "context-tokens",
            "HistoPrism, 4 context tokens",
            "histoprism",
            config={"model": {"context_tokens": 4}},
        ),
        Variant(
            "no-input-dropout",
            "HistoPrism without input dropout (default of 0.3.0)",
            "histoprism",
            config={"model": {"input_dropout": 0.0}},
            compared_by_default=False,
        ),
        # the spatial modules the rings replaced (docs/recipes.md), named for comparisons
        Variant(
            "neighbour-mean",
            "HistoPrism, 6-neighbour mean (default until 2026-12-07)",
            "histoprism",
            config={"model": _NEIGHBOUR_MEAN},
            compared_by_default=False,
        ),
        Variant(
            "neighbours-18",
            "HistoPrism, 18-neighbour mean",
            "histoprism",
            config={"model": {**_NEIGHBOUR_MEAN, "neighbours": 18}},
            compared_by_default=False,
        ),
        Variant(
            "local-attention-300",
            "HistoPrism, 6-neighbour mean, attention within 300 µm",
            "histoprism",
            config={
                "model": {**_NEIGHBOUR_MEAN, "attention": "local", "attention_radius_um": 300.0}
            },
            compared_by_default=False,
        ),
        Variant("mlp", "per-spot MLP", "mlp"),
        Variant("ridge-knn", "ridge + kNN smoothing", "ridge-knn"),
        Variant("ridge", "ridge (HEST-bench)", "ridge"),
    )
}


def select_variants(names: list[str] | None) -> tuple[Variant, ...]:
    """The variants named in ``names`` (those compared by default when None or empty), in
    registry order."""
    if not names:
        return tuple(v for v in VARIANTS.values() if v.compared_by_default)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)} (have: {', '.join(VARIANTS)})")
    return tuple(v for v in VARIANTS.values() if v.name in names)


def _resolve(ref: str) -> Callable[..., Any]:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)
