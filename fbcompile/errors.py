"""The errors fbcompile raises.

Every error derives from :class:`FBCompileError`, so ``except FBCompileError`` catches anything the
compiler, the runtime, the verifier, the data readers or the command line raise on purpose.
Messages name the offending thing: the fx node (``node.format_node()``), the op, the argument or
option, and the valid choices where there are some.
"""
from __future__ import annotations


class FBCompileError(Exception):
    """Base class of every error fbcompile raises."""


class UntraceableModelError(FBCompileError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class UnsupportedOpError(FBCompileError):
    """One or more forward nodes have no feedback rule for the requested condition.

    ``nodes`` lists every unsupported node at once (see :func:`fbcompile.coverage`).
    """

    def __init__(self, message: str, nodes: list | None = None):
        super().__init__(message)
        self.nodes = list(nodes or [])


class RuleError(FBCompileError):
    """A rule is malformed, registered twice, or cannot handle the node it was given."""


class ConditionError(FBCompileError):
    """A Jacobian matching condition (T, P, I) cannot be met by a node, e.g. a singular or
    non-square Linear layer under condition I, or a dense operator too large to invert."""


class OptionError(FBCompileError):
    """An option is unknown, out of range, or does not apply to the chosen algorithm."""


class NonFiniteError(FBCompileError):
    """A training step produced non-finite targets or updates; nothing was changed."""


class TrainingModeError(FBCompileError):
    """A program whose captured graph depends on the train/eval mode (functional dropout, ``if
    self.training:``) runs with training flags other than those it was compiled with."""


class DataError(FBCompileError):
    """A dataset specification, path or file is missing or malformed."""


class BenchmarkError(FBCompileError):
    """A benchmark measurement failed (its subprocess exited with an error)."""


class UnsafeFileError(DataError):
    """A data file (checkpoint, dataset batch) asks to construct something its format never holds,
    such as a pickled object that would run code; it is refused before anything is built."""


def choices_text(choices) -> str:
    """Format valid choices for an error message: ``'a', 'b' or 'c'``."""
    items = [repr(c) for c in sorted(choices, key=str)]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]
