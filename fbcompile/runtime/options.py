"""Learner options: each algorithm declares its options once; unknown options, options that do not
apply to the algorithm and out-of-range values raise OptionError naming the option and the choices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import OptionError, choices_text


@dataclass(frozen=True)
class Option:
    default: Any
    check: Callable[[Any], str | None]   # a problem description, or None when the value is fine
    doc: str


def positive(value) -> str | None:
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else "must be >= 0"


def positive_int(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an int >= 1"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def integer(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "must be an int"


def one_of(*choices) -> Callable:
    def check(value):
        return None if value in choices else f"must be {choices_text(choices)}"
    check.choices = choices
    return check


def anything(value) -> str | None:
    return None


def parse_options(algorithm: str, spec: dict, given: dict, *, elsewhere: dict | None = None) -> dict:
    """Validate ``given`` against ``spec`` (name -> Option); fill defaults.

    ``elsewhere`` maps option names that exist for *other* algorithms to those algorithms, so the
    message can say the option does not apply here rather than that it does not exist."""
    for name, value in given.items():
        if name not in spec:
            others = (elsewhere or {}).get(name)
            if others:
                raise OptionError(f"option {name!r} does not apply to algorithm {algorithm!r} (it is an option of "
                                  f"{choices_text(others)}); options of {algorithm!r}: {choices_text(spec)}")
            raise OptionError(f"unknown option {name!r} for algorithm {algorithm!r}; valid options: "
                              f"{choices_text(spec)}")
        problem = spec[name].check(value)
        if problem:
            raise OptionError(f"option {name}={value!r} for algorithm {algorithm!r} {problem}")
    return {name: given.get(name, option.default) for name, option in spec.items()}


OPTIMIZERS = ("adam", "sgd")     # a learner's own optimizers (optimizer_option)
OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                     "rmsprop": torch.optim.RMSprop}
WITH_MOMENTUM = ("sgd", "rmsprop")


def optimizer_option(what: str) -> Option:
    return Option("adam", one_of(*OPTIMIZERS), f"optimizer of the {what}")


def make_optimizer(kind: str, params, lr: float, weight_decay: float = 0.0, *, momentum: float = 0.0,
                   fused: bool = False):
    """The one optimizer factory: the model's (command line, recommended settings) and a learner's own
    (feedback weights, heads). ``kind`` is a key of :data:`OPTIMIZER_CLASSES`; ``momentum`` applies
    to sgd and rmsprop only; ``fused`` asks for the single-pass kernel where this torch has one (it
    falls back to the default implementation where it has not)."""
    if kind not in OPTIMIZER_CLASSES:
        raise OptionError(f"unknown optimizer {kind!r}; use {choices_text(OPTIMIZER_CLASSES)}")
    if not lr > 0:
        raise OptionError(f"lr must be > 0, got {lr}")
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    if kind in WITH_MOMENTUM:
        kwargs["momentum"] = momentum
    elif momentum:
        raise OptionError(f"momentum applies to {' and '.join(WITH_MOMENTUM)}, not {kind!r}")
    cls, params = OPTIMIZER_CLASSES[kind], list(params)
    if fused:
        try:
            return cls(params, **kwargs, fused=True)
        except (TypeError, RuntimeError, ValueError):
            pass
    return cls(params, **kwargs)
