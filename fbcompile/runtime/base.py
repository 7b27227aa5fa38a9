"""The learner contract shared by every algorithm.

``learner.step(inputs, targets, loss_fn)`` computes the parameter updates of one batch and adds
them to the model parameters' ``.grad`` (on the scale of the gradient of ``loss_fn``), so any
optimizer, scheduler, clipping or all-reduce applies unchanged. It returns a :class:`StepResult`.

A step is a transaction: updates are computed into temporaries, checked to be finite, and only then
written. If anything fails (non-finite targets or updates, a singular inverse, a bad shape) the step
raises and leaves the model's parameters, ``.grad``, buffers and all learner state (auxiliary
weights, their optimizer, random generators) exactly as they were.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..errors import FBCompileError, NonFiniteError
from ..program import accumulate_grads, as_tuple
from .options import Option, integer, parse_options

COMMON_OPTIONS = {"seed": Option(0, integer, "seed of the learner's random generators (feedback weights, noise)")}


@dataclass
class StepResult:
    loss: float
    output: torch.Tensor
    details: dict = field(default_factory=dict)


class Learner:
    """Base class. Subclasses set ``name`` and ``OPTIONS`` and implement :meth:`compute`."""

    name = "learner"
    OPTIONS: dict = {}
    # False where compute() never writes learner state (its fixed matrices and generator are only
    # read): a step's transaction then snapshots just the model buffers and the global RNG.
    step_writes_state = True

    def __init__(self, program, **options):
        from . import other_algorithms_with
        self.options = parse_options(self.name, {**COMMON_OPTIONS, **self.OPTIONS}, options,
                                     elsewhere=other_algorithms_with(self.name))
        self.program = program
        self.model = program.model
        self.generator = torch.Generator().manual_seed(self.options["seed"])
        self.steps = 0
        self.last = {}
        self.buffers = dict(self.model.named_buffers())

    # -- the contract ---------------------------------------------------------------------------
    def step(self, inputs, targets, loss_fn) -> StepResult:
        inputs = as_tuple(inputs)
        with self.transaction():
            result, grads = self.compute(inputs, targets, loss_fn)
            check_finite(grads, result)
        accumulate_grads(self.program.params, list(grads), list(grads.values()))
        self.steps += 1
        return result

    def compute(self, inputs: tuple, targets, loss_fn) -> tuple[StepResult, dict]:
        """(result, {parameter name: update}) without touching ``.grad``; may update auxiliary state."""
        raise NotImplementedError

    def parameters(self) -> list:
        """The learner's auxiliary trainable parameters (never the model's)."""
        return []

    def predict(self, inputs):
        with torch.no_grad():
            return self.model(*as_tuple(inputs))

    def diagnostics(self, inputs, targets, loss_fn):
        from .diagnostics import diagnose
        return diagnose(self, as_tuple(inputs), targets, loss_fn)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"algorithm": self.name, "options": dict(self.options), "steps": self.steps,
                "generator": self.generator.get_state(), **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != self.name:
            raise FBCompileError(f"state of algorithm {state.get('algorithm')!r} cannot be loaded into a "
                                 f"{self.name!r} learner")
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- transactions ---------------------------------------------------------------------------
    def transaction(self):
        return _Transaction(self)

    def unwritten_tensors(self, state: dict) -> list:
        """Tensors of ``state`` that no step writes, shared rather than copied by snapshots (the
        generator state is a fresh copy already; subclasses add fixed random matrices)."""
        return [state["generator"]]


class _Transaction:
    """Snapshot learner state and model buffers; restore them if the block raises."""

    def __init__(self, learner: Learner, always_restore: bool = False):
        self.learner, self.always_restore = learner, always_restore

    def __enter__(self):
        self.state = None
        if self.learner.step_writes_state or self.always_restore:
            state = self.learner.state_dict()
            self.state = _snapshot(state, {id(t) for t in self.learner.unwritten_tensors(state)})
        self.buffers = {n: b.detach().clone() for n, b in self.learner.buffers.items()}
        self.rng = torch.random.get_rng_state()
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None or self.always_restore:
            if self.state is not None:
                self.learner.load_state_dict(self.state)
            with torch.no_grad():
                for name, buffer in self.learner.buffers.items():
                    buffer.copy_(self.buffers[name])
            torch.random.set_rng_state(self.rng)
        return False


def _snapshot(value, shared: set):
    """A copy of a state dict: tensors cloned unless their id is in ``shared``, containers rebuilt,
    anything else deep-copied (``copy.deepcopy`` of a tensor costs several times a clone)."""
    if torch.is_tensor(value):
        return value if id(value) in shared else value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _snapshot(v, shared)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v, shared) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return copy.deepcopy(value)


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite, with one device sync: a sum is finite exactly
    when no term is inf or nan (up to overflow, which is then reported as non-finite too)."""
    sums = [t.sum() for t in tensors if t is not None and t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def check_finite(grads: dict, result: StepResult) -> None:
    if _updates_finite(list(grads.values())) and math.isfinite(result.loss):
        return
    bad = [name for name, g in grads.items() if g is not None and not torch.isfinite(g).all()]
    if bad:
        raise NonFiniteError(f"non-finite update for {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                             "nothing was changed (lower the learning rate or beta, or check the inputs)")
    if not math.isfinite(result.loss):
        raise NonFiniteError(f"the loss is {result.loss}; nothing was changed")


def _updates_finite(updates: list) -> bool:
    """:func:`all_finite` for a step's own update tensors, exact (no overflow caveat) and about twice
    as fast: the fused inf/nan check behind ``torch.amp.GradScaler`` with an unscale factor of 1.
    That kernel writes its input in place (x * 1 == x, but the version counter moves), so it only
    gets tensors no autograd graph can have saved: fresh, non-view, not requiring grad."""
    fused, rest = {}, []
    for t in updates:
        if t is None or not t.numel():
            continue
        if t.is_floating_point() and t._base is None and not t.requires_grad:
            fused.setdefault(t.device, []).append(t)
        else:
            rest.append(t)
    for device, tensors in fused.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
        if bool(found):
            return False
    return all_finite(rest)
