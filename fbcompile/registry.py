"""The feedback rule registry.

A rule says how feedback crosses one canonical op. It is a function ``error(ctx, g)`` that maps the
feedback ``g`` arriving at the op's output to a dict ``{argument name: feedback}`` for the op's
tensor arguments (a list for list arguments such as ``cat``'s ``tensors``). ``error`` must be linear
in ``g``: it is the feedback Jacobian J_G at the forward operating point. Rules whose target-mode
map G is not linear also give ``target(ctx, t)`` (G itself); ``affine=True`` declares that
``target(t) - error(t)`` does not depend on ``t`` (a bias), so differences propagate linearly.

Rules are written as ordinary torch code against ``ctx`` (see :mod:`fbcompile.context`): the
compiler runs them on fx proxies to emit the feedback graph, the verifier runs them on tensors.

Register with the decorator, next to the op::

    @register_rule(LINEAR, conditions="T", kind="exact")
    def linear_transpose(ctx, g):
        "G(g) = W^T g (row form: g @ W)."
        return {"input": g @ ctx.weight("weight")}

A condition is "T" (J_G = J_F^T), "P" (J_G = J_F^+) or "I" (J_G = J_F^-1). ``kind`` is "exact",
"frozen-statistics", "linearised" or "surrogate" (or a function of ctx returning one, for ops whose
kind depends on the module's mode). ``variant`` names an alternative rule (e.g. "hadamard") chosen
only when the program asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import RuleError, choices_text
from .ops import OpSpec

CONDITIONS = ("T", "P", "I")
KINDS = ("exact", "frozen-statistics", "linearised", "surrogate")


@dataclass(eq=False)
class Rule:
    name: str
    op: str
    condition: str
    kind: str | Callable
    error: Callable
    target: Callable | None = None
    affine: bool = False
    supports: Callable | None = None
    variant: str | None = None
    complex_values: bool = False

    @property
    def linear(self) -> bool:
        """True when the target map G is affine (so G(t) - G(h) = error(t - h))."""
        return self.target is None or self.affine

    def kind_for(self, ctx) -> str:
        return self.kind(ctx) if callable(self.kind) else self.kind

    def target_map(self):
        return self.target if self.target is not None else self.error

    def __repr__(self):
        return f"Rule({self.name!r}, op={self.op!r}, condition={self.condition!r})"


_RULES: dict[tuple[str, str, str | None], Rule] = {}


def register_rule(op: OpSpec | str, *, conditions: str = "T", kind="exact", target=None,
                  affine: bool = False, supports=None, variant: str | None = None,
                  name: str | None = None, replace: bool = False, complex_values: bool = False):
    """Decorator registering ``error(ctx, g)`` as the feedback rule of ``op`` under each condition
    in ``conditions`` (e.g. ``"TPI"`` for orthogonal structural ops).

    ``supports(ctx)`` may return a reason string when a particular call cannot be handled (e.g. a
    product of two activations); the node is then reported as unsupported with that reason.
    ``complex_values=True`` declares ``error`` right for complex values too, in autograd's convention
    (feedback dL/dRe z + i dL/dIm z, so a product's transpose conjugates; :mod:`rules.fourier`);
    any other rule is refused at a node whose output or active input is complex.
    The rule's name, printed by ``explain()``, is ``"<op>.<def name>"``, so it greps to its ``def``;
    ``name`` overrides it (the rule library never does: tests/test_rule_library.py).
    Registering the same (op, condition, variant) twice raises unless ``replace=True``.
    """
    op_name = op.name if isinstance(op, OpSpec) else op
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise RuleError(f"rule for {op_name!r}: conditions must be drawn from {choices_text(CONDITIONS)}, "
                        f"got {conditions!r}")
    if isinstance(kind, str) and kind not in KINDS:
        raise RuleError(f"rule for {op_name!r}: kind must be {choices_text(KINDS)}, got {kind!r}")

    def decorate(error: Callable) -> Callable:
        for condition in conditions:
            key = (op_name, condition, variant)
            if key in _RULES and not replace:
                raise RuleError(f"a {condition} rule{' variant ' + variant if variant else ''} for op "
                                f"{op_name!r} is already registered ({_RULES[key].name}); "
                                "pass replace=True to override it")
            _RULES[key] = Rule(name or f"{op_name}.{error.__name__}", op_name, condition, kind, error,
                               target, affine, supports, variant, complex_values)
        return error

    return decorate


def find_rule(op_name: str, condition: str, variants=()) -> Rule | None:
    """The rule for ``op_name`` under ``condition``, preferring any requested variant."""
    for variant in variants:
        rule = _RULES.get((op_name, condition, variant))
        if rule is not None:
            return rule
    return _RULES.get((op_name, condition, None))


def rules_for(op_name: str) -> list[Rule]:
    return [r for (op, _, _), r in _RULES.items() if op == op_name]


def all_rules() -> list[Rule]:
    return list(_RULES.values())
