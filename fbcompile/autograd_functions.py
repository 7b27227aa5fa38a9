"""Custom ``torch.autograd.Function`` calls in ``forward``: refused unless their backward is the
derivative of their forward.

Both front ends record the ops a custom Function's ``forward`` runs and nothing of its
``backward``, so the feedback differentiates the forward. That is right for a Function whose
backward is its forward's derivative written by hand (Bloom's GeLU), and silently wrong
otherwise: under torch.export a gradient reversal (forward ``x``, backward ``-lambda g``) came out
with the wrong sign, a straight-through rounding (forward ``round(x)``, backward ``g``) with zero
gradient upstream.

- torch.fx cannot trace through a Function (its forward runs without grad):
  :func:`custom_functions_refused` names it instead of the grad mode.
- torch.export records each call (:func:`custom_functions_recorded`); afterwards
  :func:`check_recorded_functions` compares, for each Function and argument shapes, its backward
  with autograd's derivative of its forward on random float64 inputs (two draws, input scales 1
  and 3, output errors of scale 1 and 10; relative gap <= 1e-7) and refuses a Function where
  they differ, naming it and the gap. A Function whose forward runs in one dtype only (a custom
  kernel) is compared in that dtype (float32: gap <= 1e-5; half precision: 1e-2); one that runs on
  neither is refused, saying so. A backward differing only on inputs the draws never reach would
  pass; none of the Functions we know of does.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from .errors import UntraceableModelError

_FUNCTION = torch.autograd.Function
_TOLERANCE = 1e-7
_TOLERANCES = {torch.float64: _TOLERANCE, torch.float32: 1e-5}     # others (half precision): 1e-2


@contextlib.contextmanager
def _patched_apply(replacement):
    """``Function.apply`` replaced on this thread by ``replacement(cls, original, *args, **kwargs)``."""
    original = _FUNCTION.__dict__["apply"]
    owner = threading.get_ident()

    def apply(cls, *args, **kwargs):
        bound = original.__get__(None, cls)
        if threading.get_ident() != owner:
            return bound(*args, **kwargs)
        return replacement(cls, bound, *args, **kwargs)

    _FUNCTION.apply = classmethod(apply)
    try:
        yield
    finally:
        _FUNCTION.apply = original


def custom_functions_refused(frontend: str):
    """While capturing on this thread, a call of ``SomeFunction.apply`` raises."""
    def refuse(cls, original, *args, **kwargs):
        raise UntraceableModelError(
            f"forward calls the custom autograd function {_name(cls)}, which {frontend} cannot trace (its forward "
            "runs without grad); torch.export can, and fbcompile then checks that its backward is the derivative of "
            "its forward (frontend='auto' tries it)")
    return _patched_apply(refuse)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class FunctionCall:
    function: type
    arguments: tuple        # tensors as TensorSpec, other values as they are
    keywords: tuple


@contextlib.contextmanager
def custom_functions_recorded():
    """Yields a list that receives a :class:`FunctionCall` per ``SomeFunction.apply`` during the
    block (calls run as usual)."""
    calls = []

    def record(cls, original, *args, **kwargs):
        calls.append(FunctionCall(cls, tuple(map(_spec, args)), tuple((k, _spec(v)) for k, v in kwargs.items())))
        return original(*args, **kwargs)

    with _patched_apply(record):
        yield calls


def check_recorded_functions(calls: list) -> None:
    """Refuse the first recorded Function whose backward is not its forward's derivative."""
    for call in {repr(c): c for c in calls}.values():          # once per Function and argument shapes
        gap = derivative_gap(call)
        dtypes = {a.dtype for a in call.arguments if isinstance(a, TensorSpec) and a.dtype.is_floating_point}
        if gap == float("inf") and len(dtypes) == 1:            # a kernel of one dtype: compare in it
            dtype = dtypes.pop()
            gap = derivative_gap(call, dtype) * _TOLERANCE / _TOLERANCES.get(dtype, 1e-2)
        if not gap <= _TOLERANCE:
            found = (f"relative gap {gap:.2g} on random inputs" if gap != float("inf") else
                     "it could not be run on random float64 inputs to compare them")
            raise UntraceableModelError(
                f"forward calls the custom autograd function {_name(call.function)}, whose backward is not shown to "
                f"be the derivative of its forward ({found}); the feedback would "
                "differentiate the forward instead of the gradient it defines (a gradient reversal would flip sign, "
                "a straight-through estimator would pass nothing). Write the forward so that its autograd derivative "
                "is the one wanted (a straight-through round is x + (x.round() - x).detach()), or wrap the call in a "
                "module and register a rule for it (examples/custom_rule.py)")


def derivative_gap(call: FunctionCall, dtype: torch.dtype = torch.float64) -> float:
    """Largest relative difference between the Function's backward and autograd's derivative of its
    forward over two random draws in ``dtype`` (module docstring); inf where the forward cannot run
    on them."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for scale, error_scale in ((1.0, 1.0), (3.0, 10.0)):
        args = [_draw(a, scale, generator, dtype) for a in call.arguments]
        kwargs = {k: _draw(v, scale, generator, dtype) for k, v in call.keywords}
        leaves = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.requires_grad]
        try:
            defined = _outputs(call.function.apply(*args, **kwargs))
            derived = _outputs(_forward(call.function, args, kwargs))
        except Exception:  # noqa: BLE001  (a forward that only runs in its own dtype or device)
            return float("inf")
        errors = [torch.randn(o.shape, generator=generator, dtype=o.dtype) * error_scale for o in defined]
        ours, theirs = _grads(defined, leaves, errors), _grads(derived, leaves, errors)
        for a, b in zip(ours, theirs):
            worst = max(worst, float((a - b).norm() / max(float(b.norm()), float(a.norm()), 1e-30)))
    return worst


class _Context:
    """Stands in for ``ctx`` when a Function's forward is called directly."""
    needs_input_grad = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_dirty(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def _forward(function: type, args: list, kwargs: dict):
    """The Function's forward run by autograd (its ops differentiated, as a capture records them)."""
    with torch.enable_grad():
        if _takes_context(function):
            return function.forward(_Context(), *args, **kwargs)
        return function.forward(*args, **kwargs)


def _takes_context(function: type) -> bool:
    """Whether ``forward`` takes ``ctx`` first (no ``setup_context`` of its own)."""
    return function.setup_context is _FUNCTION.setup_context


def _grads(outputs: list, leaves: list, errors: list) -> list:
    pairs = [(o, e) for o, e in zip(outputs, errors) if o.requires_grad]
    grads = (torch.autograd.grad([o for o, _ in pairs], leaves, [e for _, e in pairs], allow_unused=True)
             if pairs else [None] * len(leaves))
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


def _outputs(value) -> list:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _spec(value):
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(_size(d) for d in value.shape), value.dtype)
    return value


def _size(dim) -> int:
    return dim if isinstance(dim, int) else int(dim.node.hint)      # a symbolic size: its example value


def _draw(value, scale: float, generator, dtype: torch.dtype):
    """A random leaf in ``dtype`` for a floating tensor's spec, zeros for an integer one (indices)."""
    if not isinstance(value, TensorSpec):
        return value
    if not value.dtype.is_floating_point:
        return torch.zeros(value.shape, dtype=value.dtype)
    return (torch.randn(value.shape, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _name(function: type) -> str:
    return f"{function.__module__}.{function.__qualname__}"

