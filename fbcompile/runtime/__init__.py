"""The shared runtime: learners for every algorithm, created with :func:`learner`."""
from __future__ import annotations

from ..errors import OptionError, choices_text
from .base import Learner, StepResult

ALGORITHMS: dict = {}


def register_algorithm(cls):
    """Class decorator adding a :class:`Learner` subclass under ``cls.name``."""
    if cls.name in ALGORITHMS and ALGORITHMS[cls.name] is not cls:
        raise OptionError(f"algorithm {cls.name!r} is already registered")
    ALGORITHMS[cls.name] = cls
    return cls


def learner(program, algorithm: str, **options) -> Learner:
    """A learner training ``program``'s model with ``algorithm`` (see :data:`ALGORITHMS`)."""
    if algorithm not in ALGORITHMS:
        raise OptionError(f"unknown algorithm {algorithm!r}; use {choices_text(ALGORITHMS)}")
    return ALGORITHMS[algorithm](program, **options)


def other_algorithms_with(name: str) -> dict:
    """option -> algorithms (other than ``name``) that have it, for 'does not apply' messages."""
    found = {}
    for other, cls in ALGORITHMS.items():
        if other != name:
            for option in cls.OPTIONS:
                found.setdefault(option, []).append(other)
    return found


from .error import ErrorPropagation, FeedbackAlignment  # noqa: E402
from .target import DifferenceTargetPropagation, TargetPropagation  # noqa: E402

for _cls in (ErrorPropagation, FeedbackAlignment, TargetPropagation, DifferenceTargetPropagation):
    register_algorithm(_cls)

from . import direct, mono_forward  # noqa: E402,F401  (each registers its algorithms)

__all__ = ["learner", "Learner", "StepResult", "ALGORITHMS", "register_algorithm"]
