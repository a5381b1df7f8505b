"""Which known cancer type a slide looks like, from its embeddings alone.

For slides whose cancer type the model never saw (or that nobody coded): ``predict --cancer auto``
and the leave-one-cancer-out benchmark (``loco.py``). A slide is described by the mean and the
standard deviation of its spots' embeddings; a multinomial logistic regression over those
descriptors, fitted on the training slides, gives each known type's probability, and the nearest
type is the closest class centroid in the standardised descriptor space. Stored in the run
directory as ``cancer_type.safetensors`` (no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._core import keys
from .._core.errors import InputError

CLASSIFIER_FILE = "cancer_type.safetensors"
MIN_CONFIDENCE = 0.5  # ``auto`` below this probability of the best type: the 'Unknown' token


def slide_descriptor(features: np.ndarray) -> np.ndarray:
    """(N, D) spot embeddings -> (2D,) float64: their mean and standard deviation."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise InputError(f"a slide needs (N, D) embeddings with N > 0, got shape {x.shape}")
    return np.concatenate([x.mean(axis=0), x.std(axis=0)])


@dataclass
class CancerTypeClassifier:
    """Logistic regression over slide descriptors, and the class centroids.

    codes: (C,) known types.  mean, scale: (F,) standardisation.  coef: (C, F), intercept: (C,)
    (one column for C = 1: every slide is that type).  centroids: (C, F) standardised class means.
    """

    codes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    centroids: np.ndarray

    def _standardise(self, features: np.ndarray) -> np.ndarray:
        d = slide_descriptor(features)
        if d.shape != self.mean.shape:
            raise InputError(
                f"embeddings of dimension {len(d) // 2}; the classifier was fitted on "
                f"{len(self.mean) // 2}"
            )
        return (d - self.mean) / self.scale

    def probabilities(self, features: np.ndarray) -> dict[str, float]:
        """(N, D) embeddings of one slide -> {known type: probability}."""
        z = self.coef @ self._standardise(features) + self.intercept  # (C,)
        p = np.exp(z - z.max())
        return dict(zip(self.codes, (p / p.sum()).tolist(), strict=True))

    def infer(self, features: np.ndarray) -> tuple[str, float]:
        """The most probable known type and its probability."""
        probs = self.probabilities(features)
        code = max(probs, key=probs.__getitem__)
        return code, probs[code]

    def code_for(self, features: np.ndarray) -> str:
        """The inferred type, or 'Unknown' when its probability is below ``MIN_CONFIDENCE``:
        what ``predict --cancer auto`` conditions on."""
        code, confidence = self.infer(features)
        return code if confidence >= MIN_CONFIDENCE else keys.UNKNOWN_CANCER

    def nearest(self, features: np.ndarray) -> str:
        """The known type whose centroid is closest (standardised descriptor space)."""
        d = np.linalg.norm(self.centroids - self._standardise(features), axis=1)
        return self.codes[int(np.argmin(d))]

    def save(self, path: str | Path) -> Path:
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.float64))
            for name in ("mean", "scale", "coef", "intercept", "centroids")
        }
        save_file(tensors, str(path), metadata={"codes": "\n".join(self.codes)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CancerTypeClassifier:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                codes = tuple((f.metadata() or {}).get("codes", "").split("\n"))
            t = {k: v.numpy() for k, v in load_file(str(path)).items()}
        except Exception as exc:  # safetensors raises several types for a bad file
            raise InputError(f"cannot read the cancer-type classifier ({exc})", path) from exc
        return cls(codes=codes, **t)


def fit_cancer_classifier(
    features: list[np.ndarray], codes: list[str], *, c: float = 1.0
) -> CancerTypeClassifier:
    """Fit on training slides: (N_i, D) embeddings and the cancer code of each slide.

    ``c``: inverse L2 strength of the logistic regression (scikit-learn's ``C``); descriptors
    are standardised first, so one value suits any encoder.
    """
    from sklearn.linear_model import LogisticRegression

    if len(features) != len(codes) or not features:
        raise InputError("the classifier needs one cancer code per training slide")
    X = np.stack([slide_descriptor(f) for f in features])  # (S, F)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X - mean) / scale
    y = np.asarray(codes, dtype=str)
    known = tuple(sorted(set(codes)))
    centroids = np.stack([Z[y == k].mean(axis=0) for k in known])
    if len(known) == 1:  # one type: certain, whatever the slide
        coef, intercept = np.zeros((1, Z.shape[1])), np.zeros(1)
    else:
        fit = LogisticRegression(C=c, max_iter=2000).fit(Z, y)
        order = [list(fit.classes_).index(k) for k in known]
        coef, intercept = fit.coef_, fit.intercept_
        if len(known) == 2:  # scikit-learn keeps one row for two classes: log-odds of the second
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-1, 1]) * intercept / 2
        coef, intercept = coef[order], intercept[order]
    return CancerTypeClassifier(known, mean, scale, coef, intercept, centroids)
