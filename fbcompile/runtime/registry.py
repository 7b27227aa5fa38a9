"""The algorithm registry: ``@register_algorithm`` next to the class, in the module that defines it.

This module imports nothing else of the runtime, so every algorithm module can import it first and
the runtime's modules import one another without a cycle (``tests/test_runtime_registry.py``
imports them in many orders). User code registers its own learners the same way::

    @fbcompile.register_algorithm
    class ScaledFeedbackAlignment(Learner):
        name = "scaled-fa"
        ...                 # see examples/custom_algorithm.py
"""
from __future__ import annotations

from ..errors import OptionError, choices_text

ALGORITHMS: dict = {}


def register_algorithm(cls=None, *, replace: bool = False):
    """Class decorator adding a :class:`~fbcompile.runtime.base.Learner` subclass under ``cls.name``.

    Registering a second class under a taken name raises unless ``replace=True`` (for scripts that
    may run twice in one process); ``@register_algorithm`` and ``@register_algorithm(replace=True)``
    both work."""
    def add(cls):
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name == "learner":
            raise OptionError(f"{cls.__qualname__} needs a class attribute 'name' (the algorithm's name) to be "
                              "registered")
        if name in ALGORITHMS and ALGORITHMS[name] is not cls and not replace:
            raise OptionError(f"algorithm {name!r} is already registered (by {ALGORITHMS[name].__qualname__}); "
                              "pick another name or pass replace=True")
        ALGORITHMS[name] = cls
        return cls
    return add if cls is None else add(cls)


def algorithm_class(algorithm: str):
    """The learner class registered under ``algorithm``."""
    if algorithm not in ALGORITHMS:
        raise OptionError(f"unknown algorithm {algorithm!r}; use {choices_text(ALGORITHMS)}")
    return ALGORITHMS[algorithm]


def other_algorithms_with(name: str) -> dict:
    """option -> algorithms (other than ``name``) that have it, for 'does not apply' messages."""
    found = {}
    for other, cls in ALGORITHMS.items():
        if other != name:
            for option in cls.OPTIONS:
                found.setdefault(option, []).append(other)
    return found
