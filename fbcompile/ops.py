"""Canonical ops: every spelling of an operation maps to one :class:`OpSpec`, matched by identity.

``nn.ReLU``, ``F.relu``, ``torch.relu``, ``torch.relu_``, ``x.relu()`` and ``x.relu_()`` are one op,
"relu". An op is declared once, next to its feedback rules in ``rules/``, with:

- ``apply``: the pure, out-of-place functional forward. Its Python signature *is* the canonical
  signature: function and method spellings are bound against it, so its parameter names follow
  torch's (``input``, ``other``, ``weight``, ...).
- ``modules``: nn.Module classes and, for each, a binder ``module -> dict`` giving the canonical
  arguments the module holds (parameters, buffers, hyperparameters). The node's own positional
  argument binds to ``apply``'s first parameter.
- ``functions`` / ``methods``: callables (``F.relu``, ``operator.add``) and Tensor methods
  (``torch.Tensor.relu``), each optionally marked in-place.
- ``tapped``: for ops whose feedback needs something the plain forward does not return (max-pool
  indices, a dropout mask, normalisation statistics), a forward returning ``(out, *extras)`` with
  ``extras`` naming them. The forward program calls it instead of the original spelling.
- ``replay``: for ops that draw randomness (dropout), the forward re-evaluated with saved extras,
  used by verification to differentiate the very function that ran.
- ``param_grads``: the weight-gradient formula ``(ctx, g) -> {role: grad}`` given the error ``g``
  at the op's output; ops without one get :func:`autograd_param_grads`, a local autograd vjp.
- ``batch_local``: ``ctx -> bool``, whether this call maps each sample (index along dim 0)
  independently; verification then measures per-sample Jacobian blocks. Default: yes, as long as
  inputs and outputs all lead with the batch. Ops that can reduce, concatenate, split or move dim 0,
  or that use batch statistics, declare it.
- ``apart``: for ops that can couple the samples through batch statistics (a functional BatchNorm
  call in train mode), ``arguments -> value``: the same call with the statistics held fixed, so
  each sample is mapped on its own. The batch-layout check (:mod:`fbcompile.passes.batch_layout`)
  runs it instead: which rows hold a sample does not depend on the statistics' values.

These come in three groups, each a small frozen record that ``declare_op`` takes whole or as the
flat keywords above: :class:`Spellings` (modules, functions, methods, inplace: how code writes the
op), :class:`TappedForward` (tapped, extras, replay: what feedback and verification read) and
:class:`Training` (param_grads, batch_local, shape_only, apart).

What an op *is* (its traits, e.g. :attr:`OpSpec.weights`, the weight arguments its signature names)
is read off the declaration; policies built on traits live with their pass (TP units:
:func:`fbcompile.passes.units.starts_unit`), not in flags on the op.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import RuleError

# Methods of torch.Tensor are reached through fx as strings; we resolve them to the function object
# (``getattr(torch.Tensor, name)``) and match that by identity like any other callable.
INPLACE = "inplace"


@dataclass(eq=False)
class OpSpec:
    name: str
    apply: Callable
    modules: dict = field(default_factory=dict)
    functions: tuple = ()
    methods: tuple = ()
    inplace: tuple = ()
    tapped: Callable | None = None
    extras: tuple = ()
    replay: Callable | None = None
    param_grads: Callable | None = None
    batch_local: Callable | None = None
    shape_only: tuple = ()
    apart: Callable | None = None
    signature: inspect.Signature = field(init=False)

    def __post_init__(self):
        self.signature = inspect.signature(self.apply)

    def __repr__(self):
        return f"OpSpec({self.name!r})"

    @property
    def weights(self) -> tuple:
        """The op's weight arguments: the parameters of ``apply`` named ``weight`` or ``*_weight``
        (torch's naming: Linear, Conv, Embedding, the norms' gains, attention's projections)."""
        return tuple(p for p in self.signature.parameters if p == "weight" or p.endswith("_weight"))

    def split(self, arguments: dict) -> tuple[tuple, dict]:
        """Positional and keyword parts of canonical ``arguments`` (handles ``*args`` ops)."""
        bound = inspect.BoundArguments(self.signature, dict(arguments))
        return bound.args, bound.kwargs

    def run(self, fn: Callable, arguments: dict):
        """Call ``fn`` (``apply``, ``tapped`` or ``replay``) with canonical ``arguments``."""
        args, kwargs = self.split(arguments)
        return fn(*args, **kwargs)


_OPS: dict[str, OpSpec] = {}
_BY_CALLABLE: dict[Any, tuple[OpSpec, bool]] = {}
_BY_MODULE: dict[type, OpSpec] = {}


@dataclass(frozen=True)
class Spellings:
    """How user code writes an op (tracing): ``modules`` maps nn.Module classes to their binders,
    ``functions`` and ``methods`` are callables and Tensor methods; ``inplace`` lists the in-place
    ones among them (they run out of place in the compiled forward, so saved activations are never
    overwritten)."""
    modules: dict = field(default_factory=dict)
    functions: tuple = ()
    methods: tuple = ()
    inplace: tuple = ()


@dataclass(frozen=True)
class TappedForward:
    """A forward returning ``(out, *extras)`` for an op whose feedback needs what the plain forward
    does not return, and (random ops) ``replay``, the forward re-evaluated with saved extras
    (verification)."""
    forward: Callable
    extras: tuple
    replay: Callable | None = None


@dataclass(frozen=True)
class Training:
    """How the op's parameters learn and how verification measures it: ``param_grads`` and
    ``batch_local`` (see the module docstring); ``shape_only`` names the arguments read only for
    their shape or dtype (``x.reshape_as(other)``): nothing learns or gets feedback through them,
    even when a parameter is passed there; ``apart`` (see the module docstring)."""
    param_grads: Callable | None = None
    batch_local: Callable | None = None
    shape_only: tuple = ()
    apart: Callable | None = None


_FLAT_KEYWORDS = {"modules": "spellings", "functions": "spellings", "methods": "spellings",
                  "inplace": "spellings", "extras": "tapped", "replay": "tapped", "param_grads": "training",
                  "batch_local": "training", "shape_only": "training",
                  "apart": "training"}


def declare_op(name: str, apply: Callable, spellings: Spellings | None = None, *,
               tapped: TappedForward | Callable | None = None, training: Training | None = None,
               replace: bool = False, **flat) -> OpSpec:
    """Declare a canonical op and all its spellings. Returns the :class:`OpSpec` (rules refer to it).

    The groups' fields may also be given as keywords, as before the groups existed: ``modules``,
    ``functions``, ``methods``, ``inplace`` (:class:`Spellings`); ``tapped=forward`` with ``extras``
    and ``replay`` (:class:`TappedForward`); ``param_grads``, ``batch_local``, ``shape_only``,
    ``apart`` (:class:`Training`).
    """
    if name in _OPS and not replace:
        raise RuleError(f"op {name!r} is already declared; pass replace=True to redeclare it")
    spellings, tapped, training = _groups(name, spellings, tapped, training, flat)
    spec = OpSpec(name, apply, dict(spellings.modules), tuple(spellings.functions), tuple(spellings.methods),
                  tuple(spellings.inplace), tapped and tapped.forward, tapped.extras if tapped else (),
                  tapped and tapped.replay, training.param_grads or autograd_param_grads, training.batch_local,
                  tuple(training.shape_only), training.apart)
    for fn in (*spec.functions, *spec.methods, *spec.inplace):
        owner = _BY_CALLABLE.get(fn)
        if owner is not None and owner[0].name != name and not replace:
            raise RuleError(f"{fn!r} already spells op {owner[0].name!r}; cannot also spell {name!r}")
        _BY_CALLABLE[fn] = (spec, fn in spec.inplace)
    for cls in spec.modules:
        _BY_MODULE[cls] = spec
    _OPS[name] = spec
    return spec


def _groups(name: str, spellings, tapped, training, flat: dict) -> tuple:
    """(Spellings, TappedForward or None, Training) from the groups and the flat keywords."""
    unknown = sorted(set(flat) - set(_FLAT_KEYWORDS))
    if unknown:
        raise RuleError(f"declare_op({name!r}): unknown keyword(s) {', '.join(unknown)}; valid: spellings, tapped, "
                        f"training, replace, {', '.join(_FLAT_KEYWORDS)}")
    given = {"spellings": spellings, "tapped": None if callable(tapped) else tapped, "training": training}
    for key, group in _FLAT_KEYWORDS.items():
        if key in flat and given[group] is not None:
            raise RuleError(f"declare_op({name!r}): give {key!r} inside {group}= or as a keyword, not both")
    pick = lambda group: {k: v for k, v in flat.items() if _FLAT_KEYWORDS[k] == group}
    spellings = spellings or Spellings(**{**pick("spellings"), "modules": flat.get("modules") or {}})
    if callable(tapped):
        tapped = TappedForward(tapped, **{"extras": (), **pick("tapped")})
    elif pick("tapped"):
        raise RuleError(f"op {name!r}: extras and replay belong to a tapped forward (tapped=...)")
    if tapped is not None and not tapped.extras:
        raise RuleError(f"op {name!r}: a tapped forward must name its extras")
    return spellings, tapped, training or Training(**pick("training"))


def autograd_param_grads(ctx, g) -> dict:
    """Default ``param_grads``: the vjp of the op's ``apply`` with respect to its parameters, as one
    feedback-graph node (the op is passed by name: fx graphs hold strings, not OpSpecs)."""
    roles = tuple(ctx.op_call.params)
    grads = ctx.call(param_vjp, ctx.op_call.spec.name, ctx.forward_args(), roles, g)
    return {role: grads[i] for i, role in enumerate(roles)}


def param_vjp(op_name: str, args: dict, roles: tuple, g) -> tuple:
    """<apply(args), g> differentiated with respect to the arguments named in ``roles``."""
    spec = get_op(op_name)
    params = {role: args[role].detach().requires_grad_(True) for role in roles}
    with torch.enable_grad():
        out = spec.run(spec.apply, {**args, **params})
        return torch.autograd.grad(out, list(params.values()), g, allow_unused=True)


def substituted(arguments: dict, slots, values) -> dict:
    """``arguments`` with each slot's value replaced: a slot is ``(name, None)`` for an argument or
    ``(name, i)`` for element i of a list argument (the slots of ``OpCall.active``)."""
    arguments = dict(arguments)
    for (name, index), value in zip(slots, values):
        if index is None:
            arguments[name] = value
        else:
            items = list(arguments[name])
            items[index] = value
            arguments[name] = type(arguments[name])(items)
    return arguments


def get_op(name: str) -> OpSpec:
    if name not in _OPS:
        raise RuleError(f"unknown op {name!r}; declared ops: {', '.join(sorted(_OPS))}")
    return _OPS[name]


def declared_ops() -> dict[str, OpSpec]:
    return dict(_OPS)


def tensor_method(name: str):
    """The function object behind a Tensor method name (what fx's call_method target names)."""
    return getattr(torch.Tensor, name, None)


_OPTIONAL: list = []


def optional_spellings(declare: Callable) -> Callable:
    """Decorator registering ``declare()``, which declares spellings from an optional third-party
    package (torchvision's stochastic depth) once the user has imported it; run before every capture,
    so it must check ``sys.modules`` and be idempotent. fbcompile itself never imports the package."""
    _OPTIONAL.append(declare)
    return declare


def declare_optional_spellings() -> None:
    for declare in _OPTIONAL:
        declare()


def lookup_callable(target) -> tuple[OpSpec, bool] | None:
    return _BY_CALLABLE.get(target)


@dataclass(frozen=True)
class AtenSpelling:
    """How one ATen overload (``torch.ops.aten.linear.default``) spells a canonical op: ``adapter(node,
    *args, **kwargs)`` returns the canonical arguments (names of the op's ``apply``) or raises
    FBCompileError naming the argument it cannot express; ``inplace`` marks ``relu_``-style overloads;
    ``differentiable=False`` an overload autograd has no derivative for (``aten.copy``): forward
    programs call the op's ``apply`` instead, so learners that differentiate the forward can."""
    op: str
    adapter: Callable
    inplace: bool = False
    differentiable: bool = True


_BY_ATEN: dict[Any, AtenSpelling] = {}


def declare_aten(overload, op_name: str, adapter: Callable, inplace: bool = False, differentiable: bool = True) -> None:
    """Bind an ATen OpOverload (matched by identity) to the canonical op ``op_name``. One overload
    spells one op: declaring it again for another op raises."""
    owner = _BY_ATEN.get(overload)
    if owner is not None and owner.op != op_name:
        raise RuleError(f"{overload} already spells op {owner.op!r}; cannot also spell {op_name!r}")
    _BY_ATEN[overload] = AtenSpelling(op_name, adapter, inplace, differentiable)


def lookup_aten(target) -> AtenSpelling | None:
    return _BY_ATEN.get(target) if isinstance(target, torch._ops.OpOverload) else None


def aten_spellings() -> dict:
    return dict(_BY_ATEN)


def lookup_module(module: nn.Module) -> OpSpec | None:
    """The op a module spells: its own class, else the nearest registered base class whose forward
    it does not override (a subclass with its own forward is traced through, not matched)."""
    for cls in type(module).__mro__:
        spec = _BY_MODULE.get(cls)
        if spec is not None:
            return spec if type(module).forward is cls.forward else None
    return None

