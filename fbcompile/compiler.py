"""``compile`` and ``coverage``: from an nn.Module to a :class:`FeedbackProgram`."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn
from torch.fx.node import _get_qualified_name

from .context import RuleContext
from .errors import OptionError, UnsupportedOpError, choices_text
from .passes.reach import check_parameter_coverage
from .passes.units import partition
from .program import FeedbackProgram, as_tuple
from .registry import CONDITIONS, all_rules, find_rule, rules_for
from .trace import info, trace_model


@dataclass(frozen=True)
class Unsupported:
    """A forward node fbcompile cannot derive feedback for, and why."""
    node: str
    op: str
    target: str
    reason: str
    line: str
    canonical: str = ""     # the canonical op name when the node was recognised ("linear", "relu")

    def __str__(self):
        where = f"\n      at {self.line}" if self.line else ""
        op = f" (op {self.canonical!r})" if self.canonical else ""
        return f"{self.node} = {self.op}[{self.target}]{op}: {self.reason}{where}"


def compile(model: nn.Module, example_inputs, *, condition: str = "T", variants=(), units="layer",
            kwargs: dict | None = None) -> FeedbackProgram:
    """Trace ``model`` on ``example_inputs`` and derive its feedback graph.

    ``condition``: "T" (feedback Jacobian = transposed forward Jacobian, the default), "P"
    (pseudo-inverse) or "I" (inverse). ``variants``: alternative rules to prefer, e.g.
    ``("hadamard",)`` for the activation feedback of paper 002 eq. 29. ``units``: how nodes group
    into TP units ("layer", "op", "module", ("module", depth) or a callable node -> key).
    ``kwargs``: constant values for ``forward`` arguments after the example inputs (the others
    keep their defaults).
    Raises :class:`~fbcompile.errors.UnsupportedOpError` listing every unsupported node at once.
    """
    _check_condition(condition)
    _check_variants(variants)
    return compile_traced(model, trace_model(model, as_tuple(example_inputs), kwargs), condition, variants, units)


def compile_traced(model, traced, condition, variants, units) -> FeedbackProgram:
    """Compile an already traced model (also used to change condition, variants or units cheaply)."""
    _check_condition(condition)
    rules, problems = select_rules(traced, condition, variants)
    if problems:
        listing = "\n  ".join(str(p) for p in problems)
        raise UnsupportedOpError(
            f"{len(problems)} node(s) of {type(model).__name__} have no condition-{condition} feedback rule:\n  "
            f"{listing}\nRegister one with @fbcompile.register_rule (see examples/custom_rule.py).", problems)
    program = FeedbackProgram(model, traced, condition, variants, rules, partition(traced, units), units)
    check_parameter_coverage(traced, model, program.feedback["error"].params)
    return program


def coverage(model: nn.Module, example_inputs, *, condition: str = "T", variants=(), kwargs: dict | None = None) -> list:
    """Every node of ``model`` that has no feedback rule under ``condition``, found before compiling
    (empty when everything is supported). Raises only if the model cannot be traced at all."""
    _check_condition(condition)
    _check_variants(variants)
    traced = trace_model(model, as_tuple(example_inputs), kwargs)
    return select_rules(traced, condition, variants)[1]


def select_rules(traced: fx.GraphModule, condition: str, variants=()) -> tuple[dict, list]:
    rules, problems = {}, []
    for node in traced.graph.nodes:
        record = info(node)
        if not record.active or record.role != "op":
            continue
        reason = record.problem
        if reason is None:
            name = record.call.spec.name
            rule = find_rule(name, condition, variants)
            if rule is None:
                available = sorted({r.condition for r in rules_for(name)})
                reason = (f"op {name!r} has no condition-{condition} rule"
                          + (f" (it has {', '.join(available)})" if available else ""))
            else:
                reason = rule.supports(RuleContext(node)) if rule.supports else None
                rules[node] = rule
        if reason is not None:
            canonical = record.call.spec.name if record.call is not None else ""
            problems.append(Unsupported(node.name, node.op, _target_name(node), reason, record.source, canonical))
    return rules, problems


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(node.graph.owning_module.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    try:
        return _get_qualified_name(node.target).replace("_operator.", "operator.")   # torch.cumsum
    except Exception:   # noqa: BLE001  (callables fx cannot name)
        return getattr(node.target, "__qualname__", None) or str(node.target)


def _check_variants(variants) -> None:
    if isinstance(variants, str):
        raise OptionError(f"variants={variants!r} must be a tuple of names, e.g. ({variants!r},)")
    known = sorted({rule.variant for rule in all_rules() if rule.variant})
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise OptionError(f"unknown rule variant(s) {', '.join(map(repr, unknown))}; registered variants: "
                          f"{choices_text(known)}")


def _check_condition(condition: str) -> None:
    if condition not in CONDITIONS:
        raise OptionError(f"condition={condition!r} is not a Jacobian matching condition; use "
                          f"{choices_text(CONDITIONS)}")
