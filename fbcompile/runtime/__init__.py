"""The shared runtime: learners for every algorithm, created with :func:`learner`.

Each algorithm registers itself with ``@register_algorithm`` (:mod:`.registry`) in the module that
defines it; importing this package imports those modules, so :data:`ALGORITHMS` lists them all.
"""
from __future__ import annotations

from .registry import ALGORITHMS, algorithm_class, other_algorithms_with, register_algorithm
from .base import Learner, StepResult
from . import error, target, direct, direct_ddtp, mono_forward, mono_dd  # noqa: F401  (each registers its algorithms)


def learner(program, algorithm: str, **options) -> Learner:
    """A learner training ``program``'s model with ``algorithm`` (see :data:`ALGORITHMS`)."""
    return algorithm_class(algorithm)(program, **options)


__all__ = ["learner", "Learner", "StepResult", "ALGORITHMS", "register_algorithm", "other_algorithms_with"]
