"""histoprism: spatial gene expression predicted from H&E histology, and how coherent it is.

    import histoprism as hp
    hp.train("cohort/", "uni", "run/")
    hp.predict("run/", "cohort/", "uni", "pred/")
    hp.evaluate("pred/", "cohort/", "eval/")

The verbs are the CLI's commands with the CLI's parameter names. Importing the package loads no
torch: every name below is imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._core.version import __version__

# public name -> "module:attribute" (a module alone for a namespace)
_EXPORTS = {
    # verbs, as the CLI names them
    "train": "histoprism.training.api:train",
    "predict": "histoprism.inference.predict:predict",
    "evaluate": "histoprism.verbs:evaluate",
    "benchmark": "histoprism.verbs:benchmark",
    "extract": "histoprism.images.extract:extract",
    "explain": "histoprism.inference.explain:explain_to_files",
    "import_sample": "histoprism.io.importer:import_sample",
    "import_checkpoint": "histoprism.integrations.authors:import_checkpoint",
    "import_published": "histoprism.integrations.published:import_published",
    "export_spatialdata": "histoprism.integrations.spatialdata:export_spatialdata",
    "report": "histoprism.plotting.report:regenerate",
    "demo": "histoprism.workflows.demo:run_demo",
    # records and readers
    "Cohort": "histoprism.io.cohort:Cohort",
    "Slide": "histoprism.io.cohort:Slide",
    "load_run": "histoprism.models.run:load",
    "read_prediction": "histoprism.io.prediction:read_prediction",
    "load_eval": "histoprism.io.evaldir:load_eval",
    "make_cohort": "histoprism.synthetic.cohort:make_cohort",
    "list_models": "histoprism.verbs:list_models",
    "list_encoders": "histoprism.verbs:list_encoders",
    "InputError": "histoprism._core.errors:InputError",
    # namespaces
    "pl": "histoprism.plotting.figures",
    "io": "histoprism.io",
    "models": "histoprism.models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'histoprism' has no attribute '{name}'")
    module, _, attr = target.partition(":")
    value = importlib.import_module(module)
    value = getattr(value, attr) if attr else value
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import io, models
    from ._core.errors import InputError
    from .images.extract import extract
    from .inference.explain import explain_to_files as explain
    from .inference.predict import predict
    from .integrations.authors import import_checkpoint
    from .integrations.published import import_published
    from .integrations.spatialdata import export_spatialdata
    from .io.cohort import Cohort, Slide
    from .io.evaldir import load_eval
    from .io.importer import import_sample
    from .io.prediction import read_prediction
    from .models.run import load as load_run
    from .plotting import figures as pl
    from .plotting.report import regenerate as report
    from .synthetic.cohort import make_cohort
    from .training.api import train
    from .verbs import benchmark, evaluate, list_encoders, list_models
    from .workflows.demo import run_demo as demo
