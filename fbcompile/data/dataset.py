"""The :class:`Dataset` record every loader returns, and the one helper that builds it from arrays."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

TASKS = ("classification", "regression")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of tensors plus what a model needs to know about them.

    ``train_x``/``test_x`` are float32 of shape ``(N, *input_shape)``. For classification
    ``train_y``/``test_y`` are int64 class indices in ``[0, num_classes)``; for regression they are
    float32 targets of shape ``(N, num_classes)`` (``num_classes`` is then the output dimension).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple
    task: str

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise DataError(f"dataset {self.name!r}: {split}_x has shape {tuple(x.shape)}, "
                                f"expected (N, {', '.join(map(str, self.input_shape))})")
            if len(x) != len(y):
                raise DataError(f"dataset {self.name!r}: {split} has {len(x)} inputs but {len(y)} targets")

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.train_x)

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return len(self.test_x)

    def describe(self) -> str:
        """One line: name, split sizes, input shape, classes (or output dim) and task."""
        shape = "x".join(map(str, self.input_shape))
        if self.task == "classification":
            out = f"{self.num_classes} classes"
        else:
            out = f"{self.num_classes} outputs (regression)"
        return f"{self.name}: {self.num_train} train / {self.num_test} test, input {shape}, {out}"


def from_arrays(name: str, train: tuple, test: tuple, *, input_shape: tuple, num_classes: int,
                task: str = "classification", scale: float = 1.0) -> Dataset:
    """Build a :class:`Dataset` from numpy ``(x, y)`` pairs.

    ``x`` is reshaped to ``(N, *input_shape)``, converted to float32 and divided by ``scale`` (255
    for uint8 images); ``y`` becomes int64 for classification and float32 for regression. The
    arrays are copied, so later in-place edits of the tensors never touch the caller's arrays.
    """
    input_shape = tuple(int(d) for d in input_shape)

    def convert(x, y):
        x = np.asarray(x)
        if x.size != len(x) * math.prod(input_shape):
            raise DataError(f"dataset {name!r}: inputs of shape {x.shape} do not reshape to "
                            f"(N, {', '.join(map(str, input_shape))})")
        xt = torch.tensor(x.reshape(len(x), *input_shape), dtype=torch.float32)
        if scale != 1.0:
            xt /= scale
        y_dtype = torch.int64 if task == "classification" else torch.float32
        return xt, torch.tensor(np.asarray(y), dtype=y_dtype)

    train_x, train_y = convert(*train)
    test_x, test_y = convert(*test)
    return Dataset(name=name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                   num_classes=int(num_classes), input_shape=input_shape, task=task)
