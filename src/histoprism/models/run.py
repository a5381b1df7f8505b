"""A run folder loaded for use: run directory -> ``Run`` (config, panel, vocabulary, predictor).

One way to rebuild a network from a run (``load_network``), one way to run its trunk over a slide
(``trunk_output``: (N, H) last hidden layer), for prediction, adaptation, prompts, the noise model
and attribution alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._core import keys
from .._core.distributed import local_device
from .._core.errors import InputError, first_line
from ..expression.genes import GenePanel
from ..expression.pathways import linear_head_scores
from ..io.cohort import Slide
from ..io.rundir import check_encoder, load_run
from .inputs import CancerVocabulary, SlideTensors, input_options, to_tensors
from .network import HistoPrism, ModelConfig
from .registry import Predictor, PredictorDefaults, model_kind


@dataclass
class HistoPrismPredictor(PredictorDefaults):
    """A trained HistoPrism with the prepare / predict_genes interface of the baselines, plus
    spot ranges and the closed-form pathway scores of its linear head."""

    model: HistoPrism
    vocab: CancerVocabulary
    device: torch.device = torch.device("cpu")
    closed_form_pathways = True  # Predictor protocol: its head is linear (pathway_scores)

    def prepare(self, slide: Slide, *, unknown_cancer: bool = False) -> torch.Tensor:
        """Run everything up to the last layer once: (N, H) on the model's device."""
        cfg = self.model.cfg
        t = to_tensors(slide, vocab=self.vocab, unknown_cancer=unknown_cancer, **input_options(cfg))
        return trunk_output(self.model, t, self.device)

    def predict_genes(
        self,
        prepared: torch.Tensor,
        cols: slice,
        rows: slice = slice(None),
        *,
        out: torch.Tensor | None = None,
    ) -> np.ndarray:
        """(len(rows), len(cols)) float32 predicted log1p for panel columns ``cols`` of spots
        ``rows``. ``out``: a reused (rows, cols) buffer on the device, which the result then
        shares on the CPU."""
        w, b = self.model.head_out.weight[cols], self.model.head_out.bias[cols]
        with torch.no_grad():
            block = torch.addmm(b, prepared[rows], w.T, out=out)
        return block.cpu().numpy()

    def linear_head(self) -> tuple[np.ndarray, np.ndarray]:
        """The head's (G, H) weight and (G,) bias, float32: X = max(h W' + b, 0)."""
        head = self.model.head_out
        return (
            head.weight.detach().float().cpu().numpy(),
            head.bias.detach().float().cpu().numpy(),
        )

    def pathway_scores(self, prepared: torch.Tensor, membership: np.ndarray) -> np.ndarray:
        """Mean z-scored prediction of each gene set's genes, in closed form from the trunk
        output (the head is linear): (N, H), (G, S) -> (N, S) float64."""
        head = self.model.head_out
        return linear_head_scores(prepared, head.weight, head.bias, membership)


@dataclass
class Run:
    """A loaded run directory: what was trained, on which genes, cancers and encoder."""

    path: Path
    config: dict
    predictor: Predictor
    panel: GenePanel
    vocab: CancerVocabulary

    @property
    def kind(self) -> str:
        return self.config["model"]


def load(
    run_dir: str | Path,
    *,
    attention: str | None = None,
    attention_radius_um: float | None = None,
    device: str | torch.device | None = None,
) -> Run:
    """Load a run directory written by ``train`` (any model kind).

    ``attention`` ("auto" | "full" | "local") and ``attention_radius_um`` override the trained
    HistoPrism's settings for prediction; ``device`` defaults to this rank's GPU, else the CPU.
    """
    config, tensors = load_run(run_dir)
    panel = GenePanel(tuple(config["genes"]))
    vocab = CancerVocabulary(tuple(config["cancers"]))
    try:
        kind = model_kind(config["model"])
    except InputError as exc:
        raise InputError(str(exc), Path(run_dir) / keys.RUN_CONFIG) from None
    try:
        predictor = kind.load_function()(
            config,
            tensors,
            panel=panel,
            vocab=vocab,
            device=torch.device(device) if device is not None else local_device(),
            overrides=dict(attention=attention, attention_radius_um=attention_radius_um),
        )
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # a config or weights file that does not describe one network: the first line of torch's
        # or the config's complaint (a missing key, a size mismatch, an unknown setting)
        what = f"missing {exc}" if isinstance(exc, KeyError) else first_line(exc)
        raise InputError(f"config and weights do not form a model ({what})", run_dir) from exc
    return Run(Path(run_dir), config, predictor, panel, vocab)


def load_histoprism(
    config: dict,
    tensors: dict,
    *,
    panel: GenePanel,
    vocab: CancerVocabulary,
    device: torch.device,
    overrides: dict,
    **_,
) -> HistoPrismPredictor:
    """The registry's load for ``histoprism``: the saved network, with the prediction-time
    ``overrides`` (attention mode and radius; None keeps the trained setting) on ``device``."""
    model = build_network(config, tensors, **overrides)
    cfg = model.cfg
    if cfg.n_genes != len(panel) or cfg.n_conditions != len(vocab.codes):
        raise ValueError(
            f"the network predicts {cfg.n_genes} genes for {cfg.n_conditions} cancer codes; "
            f"the config lists {len(panel)} genes and {len(vocab.codes)} codes"
        )
    return HistoPrismPredictor(model.to(device), vocab, device)


def slide_inputs(slide: SlideTensors, device: torch.device | str | None = None) -> dict:
    """The network's keyword inputs for one slide (absent ones left out), on ``device``."""
    return {k: v for k, v in slide.model_inputs(device).items() if v is not None}


def trunk_output(
    model: HistoPrism, slide: SlideTensors, device: torch.device | str | None = None
) -> torch.Tensor:
    """The trunk's last hidden layer over one whole slide: (N, H) float32, no gradients.

    The model's mode is the caller's (``eval()`` for no dropout)."""
    with torch.no_grad():
        return model.trunk(**slide_inputs(slide, device))[0]


def check_hidden(hidden: torch.Tensor, where: str | Path) -> None:
    """One-line InputError naming ``where`` unless the last hidden layer is finite."""
    if not torch.isfinite(hidden).all():
        raise InputError(
            "the model's last hidden layer is not finite on this slide: its embeddings lie "
            "far outside what the model was trained on (another encoder, or unnormalised?)",
            where,
        )


def build_network(config: dict, tensors: dict, **overrides) -> HistoPrism:
    """The HistoPrism network a run's config and weights describe, in eval mode; ``overrides``
    (None values ignored) replace ModelConfig fields, e.g. the attention mode at prediction."""
    cfg = ModelConfig(**config["model_config"])  # settings added since: their defaults
    try:
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise InputError(str(exc)) from None
    model = HistoPrism(cfg)
    model.load_state_dict(tensors)
    return model.eval()


def load_network(run_dir: str | Path, encoder: str) -> tuple[dict, HistoPrism]:
    """A HistoPrism run's config and network (eval mode); InputError unless the run is a
    HistoPrism trained on ``encoder`` (``train --init``, ``--prompt``)."""
    config, tensors = load_run(run_dir)
    if config.get("model") != "histoprism":
        raise InputError(
            f"--init needs a HistoPrism run, this one is '{config.get('model')}'",
            Path(run_dir) / keys.RUN_CONFIG,
        )
    check_encoder(config, encoder, run_dir=run_dir)
    return config, build_network(config, tensors)
