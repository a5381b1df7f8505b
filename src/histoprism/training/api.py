"""``histoprism train``: cohort -> run directory, for every model kind (the registry's fit
functions), with ``--init`` (adapt a pretrained run to a new panel) and ``--prompt``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from .._core import keys
from .._core.distributed import torchrun_env
from .._core.errors import InputError
from .._core.files import (
    directory_lock,
    remove_partials,
    settle_directory,
)
from ..io.cohort import Cohort, Slide
from ..io.rundir import (
    read_json_object,
)
from ..models.cancer_type import CLASSIFIER_FILE, fit_cancer_classifier
from ..models.registry import FitOptions, model_kind
from .data import load_training_data

log = logging.getLogger(__name__)


# --- one entry point for every model kind --------------------------------------------------------
def train(
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    split: str | Path | None = None,
    model: str = "histoprism",
    epochs: int | None = None,
    conditioning: bool = True,
    positional_encoding: bool = False,
    attention: str | None = None,
    attention_radius_um: float | None = None,
    crop_spots: int | None = None,
    genes: str | Path | None = None,
    seed: int = 0,
    config: str | Path | dict | None = "default",
    resume: bool = False,
    progress: bool = True,
    init: str | Path | None = None,
    prompt: bool = False,
) -> Path:
    """Train ``model`` (a ``registry.MODEL_KINDS`` name) on the cohort at ``data`` and write the
    run directory ``out``.

    Parameters mirror ``histoprism train``; ``attention``, ``attention_radius_um`` (ModelConfig)
    and ``crop_spots`` (TrainConfig) override the recipe when given. ``init``: a pretrained
    HistoPrism run whose trunk is kept and whose head is refitted to the panel ``genes``
    (``histoprism.training.adapt``; ``epochs``: fine-tuning epochs of the head, default 0). ``prompt``
    with ``init``: keep the run and fit a head that corrects it with measured spots
    (``histoprism.training.prompt``). Returns ``out``.
    """
    kind = model_kind(model)
    if prompt and init is None:
        raise InputError("--prompt fits a head on a trained run: give it with --init RUN")
    if init is not None:
        _check_init_options(model, epochs, resume)
    elif epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    options = FitOptions(
        model=model,
        encoder=encoder,
        seed=seed,
        epochs=epochs,
        conditioning=conditioning,
        positional_encoding=positional_encoding,
        attention=attention,
        attention_radius_um=attention_radius_um,
        crop_spots=crop_spots,
        config=config,
        resume=resume,
        progress=progress,
    )
    out = Path(out)
    # one process writes a run directory: a second `train` into it fails instead of silently
    # replacing its files. Under torchrun rank 0 writes, and holds the lock, for all ranks.
    writer = torchrun_env()[0] == 0
    with directory_lock(out, "training") if writer else contextlib.nullcontext():
        if writer:  # leftovers of a killed run (the lock rules out a live one)
            remove_partials(out)
            settle_directory(out / keys.RUN_LAST)
        # the automatic split (no split files) is the cohort's, not the run's: predict and
        # evaluate must see the same test slides whatever --seed a model was trained with
        cohort = Cohort(data, split_dir=split)
        if init is not None:  # refused before the slides are read
            from ..models.run import load_network
            from .adapt import adapt

            init_config, _ = load_network(init, encoder)
            if prompt:  # the prompt head corrects the run's own genes
                if genes is not None:
                    raise InputError("--prompt keeps the run's gene panel: leave --genes out")
                genes = tuple(init_config["genes"])
        td = load_training_data(cohort, encoder, genes=genes, seed=seed, progress=progress)
        if prompt:
            from ..models.prompt import PromptConfig
            from .prompt import fit_prompt

            run = fit_prompt(init, td, out, config=PromptConfig(seed=seed), progress=progress)
        elif init is not None:
            run = adapt(init, td, out, epochs=epochs or 0, seed=seed, progress=progress)
        else:
            run = kind.fit_function()(td, out, options, **kind.params)
        # for --cancer auto: which known type an uncoded slide looks like (rank 0 writes)
        if writer:
            _save_cancer_classifier(Path(run), td.train + td.val)
    return run


def _save_cancer_classifier(run: Path, slides: list[Slide]) -> None:
    """Fit ``predict --cancer auto``'s classifier on the slides of the codes the run knows (a run
    adapted from another keeps that run's vocabulary: a code it never saw could not be used)."""
    known = set(read_json_object(run / keys.RUN_CONFIG)["cancers"]) - {keys.UNKNOWN_CANCER}
    slides = [s for s in slides if s.cancer in known]
    if not slides:
        log.warning("no slide of a cancer code the run knows: no classifier for --cancer auto")
        return
    clf = fit_cancer_classifier([s.features for s in slides], [s.cancer for s in slides])
    clf.save(run / CLASSIFIER_FILE)


def _check_init_options(model: str, epochs: int | None, resume: bool) -> None:
    """InputError for options that ``--init`` (adapting a pretrained run's head) cannot honour."""
    if model != "histoprism":
        raise InputError(f"--init adapts a HistoPrism run: --model must be histoprism, not {model}")
    if epochs is not None and epochs < 0:
        raise InputError(f"--epochs must be at least 0 with --init, got {epochs}")
    if resume:
        raise InputError("--resume does not apply to --init (adapting takes minutes: rerun it)")
