"""The synthetic regression and classification sets of Frenkel et al., DRTP (paper 001, section 4).

Both are drawn from ``seed``: the same seed gives identical tensors, different seeds different draws.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .dataset import Dataset, from_arrays

NUM_FEATURES = 256

# Regression (paper 001, section 4, "Regression").
REGRESSION_OUTPUTS = 10
REGRESSION_TRAIN, REGRESSION_TEST = 5_000, 1_000

# Classification (paper 001, section 4, "Synthetic data classification").
CLASSIFICATION_INFORMATIVE = 128
CLASSIFICATION_CLASSES = 10
CLASSIFICATION_CLUSTERS = 5
CLASSIFICATION_SEP = 4.5
CLASSIFICATION_TRAIN, CLASSIFICATION_TEST = 25_000, 5_000


def regression_phases(device=None) -> torch.Tensor:
    """``phi_j = -pi/2 + j*pi/9`` for ``j = 0..9`` (float64)."""
    return -math.pi / 2 + torch.arange(REGRESSION_OUTPUTS, dtype=torch.float64, device=device) * (math.pi / 9)


def regression_targets(x: torch.Tensor) -> torch.Tensor:
    """``y_j = cos(mean(x) + phi_j)``, computed in float64 from ``x`` and returned as float32."""
    xbar = x.to(torch.float64).mean(dim=1, keepdim=True)
    return torch.cos(xbar + regression_phases(x.device)).to(torch.float32)


def load_synthetic_regression(seed: int) -> Dataset:
    """Paper 001's regression task: approximate 10 cosines of the input mean.

    Each example ``x`` is a 256-dim vector with i.i.d. entries ``N(mu, 1)``, where ``mu`` is drawn
    per example from ``U(-pi, pi)``. The 10-dim target is ``y*_j = cos(mean(x) + phi_j)`` with
    ``phi_j = -pi/2 + j*pi/9``, ``j = 0..9``. 5,000 training and 1,000 test examples. The paper
    trains a 256-100-100-10 tanh network on it with MSE loss. Targets are computed from the stored
    float32 inputs (see :func:`regression_targets`), so they match the inputs exactly.
    """
    rng = np.random.default_rng(seed)
    n = REGRESSION_TRAIN + REGRESSION_TEST
    mu = rng.uniform(-math.pi, math.pi, size=(n, 1))
    x = torch.from_numpy(rng.normal(mu, 1.0, size=(n, NUM_FEATURES)).astype(np.float32))
    y = regression_targets(x).numpy()
    x = x.numpy()
    return from_arrays("synthetic-regression", (x[:REGRESSION_TRAIN], y[:REGRESSION_TRAIN]),
                       (x[REGRESSION_TRAIN:], y[REGRESSION_TRAIN:]), input_shape=(NUM_FEATURES,),
                       num_classes=REGRESSION_OUTPUTS, task="regression")


def load_synthetic_classification(seed: int) -> Dataset:
    """Paper 001's classification task, from ``sklearn.datasets.make_classification``.

    ``n = 256`` features of which ``n_inf = 128`` are informative, 10 classes, 5 clusters per
    class, ``class_sep = 4.5``: each class's clusters are normally distributed about vertices of a
    128-dim hypercube and "the remaining features are filled with normally-distributed random
    noise", hence ``n_redundant = n_repeated = 0`` (sklearn's default of 2 redundant features
    would contradict that). 30,000 shuffled examples split 25,000 train / 5,000 test. The paper
    trains a 256-500-500-10 network (tanh hidden, sigmoid output, BCE loss) on it.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=CLASSIFICATION_TRAIN + CLASSIFICATION_TEST, n_features=NUM_FEATURES,
        n_informative=CLASSIFICATION_INFORMATIVE, n_redundant=0, n_repeated=0,
        n_classes=CLASSIFICATION_CLASSES, n_clusters_per_class=CLASSIFICATION_CLUSTERS,
        class_sep=CLASSIFICATION_SEP, shuffle=True, random_state=seed)
    return from_arrays("synthetic-classification", (x[:CLASSIFICATION_TRAIN], y[:CLASSIFICATION_TRAIN]),
                       (x[CLASSIFICATION_TRAIN:], y[CLASSIFICATION_TRAIN:]), input_shape=(NUM_FEATURES,),
                       num_classes=CLASSIFICATION_CLASSES)
