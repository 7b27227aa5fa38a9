"""Training-mode guard: refuse to run a program whose captured graph baked in the train/eval mode.

torch.fx and torch.export evaluate Python control flow on ``self.training`` once, at capture:
``F.dropout(x, p, self.training)`` keeps the flag as a constant argument, ``if self.training: ...``
keeps one branch. Leaf modules (nn.Dropout, nn.BatchNorm*) are called as modules and read their flag
at run time, so they do not bake anything in. A program captured in one mode and run in the other
would compute the other mode's function without any error.

At compile time :func:`mode_guard` captures the model a second time with every module's ``training``
flag flipped (each module's flag negated, so mixed modes flip too; restored exactly afterwards, even
on error; :func:`fbcompile.frontends.capture_model` runs both captures from the same torch RNG state
and restores it afterwards) and compares the two graphs in a canonical
form: node kinds, targets (functions by identity, module and attribute names), constant arguments and
the graph's wiring, but not node names. Equal graphs: the program runs in either mode, unguarded.
Different graphs, or a flipped capture that fails: the program records every module's flag
(:class:`ModeGuard`), and :meth:`ModeGuard.check` raises :class:`~fbcompile.errors.TrainingModeError`
when the flags differ when it runs. Flipping all flags at once can miss a graph that depends only
on whether two flags agree; no model we know of does that.

The guard is kept in ``traced.meta["fbcompile_training_mode"]`` (None: the graph does not depend on
the mode), so ``FeedbackProgram.recompile`` keeps it with the traced model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from .errors import TrainingModeError
from .trace import user_line

META = "fbcompile_training_mode"


@dataclass(frozen=True, eq=False)
class ModeGuard:
    """The per-module training flags a mode-dependent graph was captured with.

    ``modules`` are the model's modules in ``named_modules()`` order (held, so a check reads one
    attribute per module instead of walking the module tree), ``names`` their qualified names,
    ``flags`` their ``training`` flags at capture; ``where`` says where the two modes' graphs differ."""
    model_name: str
    modules: tuple = field(repr=False)
    names: tuple
    flags: tuple
    where: str

    def check(self) -> None:
        """Raise :class:`TrainingModeError` unless every module has the training flag it was
        captured with (one tuple comparison)."""
        now = tuple(m.training for m in self.modules)
        if now != self.flags:
            raise TrainingModeError(self._message(now))

    @property
    def summary(self) -> str:
        return f"captured graph depends on the training mode (compiled in {mode_name(self.flags)})"

    def _message(self, now: tuple) -> str:
        i = next(i for i, (a, b) in enumerate(zip(self.flags, now)) if a != b)
        module = (f"module {self.names[i]!r} ({type(self.modules[i]).__name__})" if self.names[i]
                  else f"the model ({self.model_name})")
        remedy = f"model.{_mode_call(now[0])}"
        if self.names[i] and now[i] != now[0]:     # mixed modes now: name the module's own call too
            remedy += f" and model.get_submodule({self.names[i]!r}).{_mode_call(now[i])}"
        return (f"{self.model_name} was compiled in {mode_name(self.flags)} but runs in {mode_name(now)} now: "
                f"{module} has training={now[i]}, compiled with training={self.flags[i]}. Its captured graph "
                f"depends on the training mode ({self.where}): torch.fx and torch.export read "
                "`self.training` once, at capture (F.dropout(x, p, self.training), `if self.training:`), "
                f"so this program would silently compute the function of {mode_name(self.flags)}. "
                f"Compile the program in the mode you run it in, e.g. call {remedy} before fbcompile.compile "
                "(one program per mode if you need both).")


def mode_name(flags: tuple) -> str:
    """"train mode", "eval mode" or "mixed mode (k of n modules in train mode)"."""
    if all(flags):
        return "train mode"
    if not any(flags):
        return "eval mode"
    return f"mixed mode ({sum(flags)} of {len(flags)} modules in train mode)"


def mode_guard(model: nn.Module, traced: fx.GraphModule,
               recapture: Callable[[], fx.GraphModule]) -> ModeGuard | None:
    """The guard of ``traced`` (captured from ``model`` in its current modes), or None when
    ``recapture()`` (the same front end) gives the same graph with every training flag flipped.
    The caller runs both captures from the same torch RNG state (a constant drawn at capture is then
    the same) and restores it afterwards (:func:`fbcompile.frontends.capture_model` does)."""
    named = list(model.named_modules())
    attributes = set(vars(model))
    with flipped_modes([m for _, m in named]):
        try:
            other = recapture()
        except Exception as exc:   # noqa: BLE001  (any capture failure: the graph depends on the mode)
            where = f"capturing it with the flags flipped fails: {type(exc).__name__}: {_first_line(exc)}"
        else:
            where = first_difference(traced.graph, other.graph, model)
        finally:
            for name in set(vars(model)) - attributes:     # fx stores tensor constants on the model
                delattr(model, name)
    if where is None:
        return None
    return ModeGuard(type(model).__name__, tuple(m for _, m in named), tuple(n for n, _ in named),
                     tuple(m.training for _, m in named), where)


def mode_guard_of(traced: fx.GraphModule) -> ModeGuard | None:
    return getattr(traced, "meta", {}).get(META)


@contextlib.contextmanager
def flipped_modes(modules: list):
    """Negate every module's ``training`` flag (the attribute itself: a module's own ``train()``
    may do more); each module gets its exact flag back afterwards, also when the block raises."""
    flags = [m.training for m in modules]
    try:
        for module, flag in zip(modules, flags):
            module.training = not flag
        yield
    finally:
        for module, flag in zip(modules, flags):
            module.training = flag


def canonical_graph(graph: fx.Graph, model: nn.Module) -> list:
    """One entry per node: (op, target, args, kwargs) with node references replaced by the index of
    the node they name, so two captures compare equal exactly when they compute the same program.
    An attribute read (``get_attr``) is named by its target when it is a parameter or buffer of
    ``model``, else (a constant the capture took from the code) by its value."""
    index = {}
    module = graph.owning_module
    state = {id(t) for t in (*model.parameters(), *model.buffers())}

    def leaf(a):
        return ("node", index[a]) if isinstance(a, fx.Node) else _constant(a)

    entries = []
    for node in graph.nodes:
        index[node] = len(index)
        kwargs = tuple(sorted((k, map_aggregate(v, leaf)) for k, v in node.kwargs.items()))
        target = node.target
        if node.op == "placeholder":      # an argument's name: a node name
            target = None
        elif node.op == "get_attr" and module is not None:
            value = _attribute(module, target)
            if id(value) not in state:    # a constant captured from the code, named by the capture
                target = ("constant", _constant(value))
        entries.append((node.op, target, map_aggregate(node.args, leaf), kwargs))
    return entries


def first_difference(graph: fx.Graph, other: fx.Graph, model: nn.Module) -> str | None:
    """Where ``graph`` first differs from ``other`` (both captured from ``model``) in canonical form
    (None: they are the same)."""
    mine, theirs = canonical_graph(graph, model), canonical_graph(other, model)
    if mine == theirs:
        return None
    nodes = list(graph.nodes)
    i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    if i >= len(nodes):
        return f"the other mode's graph has {len(theirs) - len(mine)} more node(s)"
    line = user_line(nodes[i])
    return f"the two modes' graphs differ first at node {nodes[i].name!r}" + (f", {line}" if line else "")


class _TensorConstant:
    """A tensor in a canonical graph: equal to another of the same shape, dtype, device and values."""
    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value.detach()

    def __eq__(self, other):
        a, b = self.value, getattr(other, "value", None)
        return (isinstance(other, _TensorConstant) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))

    __hash__ = None


def _constant(value):
    return _TensorConstant(value) if isinstance(value, torch.Tensor) else value


def _attribute(module: nn.Module, qualname: str):
    for name in qualname.split("."):
        module = getattr(module, name)
    return module


def _mode_call(training: bool) -> str:
    return "train()" if training else "eval()"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
