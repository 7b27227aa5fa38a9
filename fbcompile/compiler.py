"""``compile`` and ``coverage``: from an nn.Module to a :class:`FeedbackProgram`.

``compile`` runs :data:`PASSES` in order (``print(*fbcompile.compiler.PASSES, sep="\\n")`` lists
them); ``coverage`` runs the analysis passes up to rule selection; ``FeedbackProgram.recompile``
reruns the passes from rule selection on an already captured model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import fx, nn
from torch.fx.node import _get_qualified_name

from .backends import check_backend
from .context import RuleContext
from .errors import OptionError, UnsupportedOpError, choices_text
from .passes.reach import check_parameter_coverage
from .canonical import canonicalize
from .frontends import capture_model, check_frontend
from .passes.units import Partition, partition
from .program import FeedbackProgram, as_tuple
from .registry import CONDITIONS, all_rules, find_rule, rules_for
from .trace import info, propagate


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


@dataclass(frozen=True)
class Compilation:
    """What the passes have derived so far. Each pass returns a new one (``dataclasses.replace``);
    passes that annotate the traced graph write only their own ``node.meta["fbcompile"]`` fields."""
    model: nn.Module
    example_inputs: tuple
    condition: str = "T"
    variants: tuple | dict = ()         # {mode family: variants} once normalised (family_variants)
    grouping: object = "layer"
    constants: dict | None = None
    traced: fx.GraphModule | None = None
    frontend: str = "auto"              # "fx", "export" or "auto" (fbcompile.frontends)
    rules: dict | None = None
    problems: tuple = ()
    partition: Partition | None = None
    program: FeedbackProgram | None = None


@dataclass(frozen=True)
class Pass:
    """One compiler pass: a function from one :class:`Compilation` to the next."""
    name: str
    run: Callable[[Compilation], Compilation]

    def __repr__(self):
        return f"{self.name}: {(self.run.__doc__ or '').strip().splitlines()[0]}"


def _capture(c: Compilation) -> Compilation:
    """torch.fx symbolic trace or torch.export (``frontend``; "auto": fx, else export when fx cannot);
    forward arguments after the example inputs bound to constants."""
    analyse = lambda traced: list(run_passes(PASSES[1:_ANALYSIS], replace(c, traced=traced)).problems)
    return replace(c, traced=capture_model(c.model, c.example_inputs, c.constants, c.frontend, analyse))


def _propagate(c: Compilation) -> Compilation:
    """Run the example inputs: role, shape, dtype and activity (input or parameter path) per node."""
    propagate(c.traced, c.model, c.example_inputs)
    return c


def _canonicalize(c: Compilation) -> Compilation:
    """Bind every active node to its canonical op by identity (module, function, method spellings)."""
    canonicalize(c.traced, c.model)
    return c


def _choose_rules(c: Compilation) -> Compilation:
    """One feedback rule per active op and mode family (error, target) under the condition and each
    family's variants (:func:`family_variants`); the rest are problems."""
    rules, problems = select_rule_families(c.traced, c.condition, family_variants(c.variants))
    return replace(c, rules=rules, problems=tuple(problems))


def _refuse_unsupported(c: Compilation) -> Compilation:
    """Refuse the model, listing every node without a rule at once."""
    if c.problems:
        listing = "\n  ".join(str(p) for p in c.problems)
        raise UnsupportedOpError(
            f"{len(c.problems)} node(s) of {type(c.model).__name__} have no condition-{c.condition} feedback rule:\n  "
            f"{listing}\nRegister one with @fbcompile.register_rule (see examples/custom_rule.py).", list(c.problems))
    return c


def _group_units(c: Compilation) -> Compilation:
    """Group active ops into TP units (unit inputs, outputs, parameters)."""
    return replace(c, partition=partition(c.traced, c.grouping))


def _emit_error_feedback(c: Compilation) -> Compilation:
    """The program with its error-mode feedback graph (other modes are emitted when a learner asks)."""
    return replace(c, program=FeedbackProgram(c.model, c.traced, c.condition, c.variants, c.rules, c.partition,
                                              c.grouping))


def _check_parameters(c: Compilation) -> Compilation:
    """The feedback graph writes exactly the parameters autograd reaches, else a loud error."""
    check_parameter_coverage(c.traced, c.model, c.program.feedback["error"].params)
    return c


PASSES = (Pass("capture", _capture), Pass("propagate", _propagate), Pass("canonicalize", _canonicalize),
          Pass("rules", _choose_rules), Pass("refuse unsupported", _refuse_unsupported), Pass("units", _group_units),
          Pass("error feedback", _emit_error_feedback), Pass("parameter coverage", _check_parameters))
_ANALYSIS = 4        # PASSES[:_ANALYSIS] end with the rules chosen; coverage() stops there


def run_passes(passes, compilation: Compilation) -> Compilation:
    for step in passes:
        compilation = step.run(compilation)
    return compilation


def compile(model: nn.Module, example_inputs, *, condition: str = "T", variants=(), units="layer",
            kwargs: dict | None = None, frontend: str = "auto", backend=None) -> FeedbackProgram:
    """Trace ``model`` on ``example_inputs`` and derive its feedback graph, running :data:`PASSES`.

    ``condition``: "T" (feedback Jacobian = transposed forward Jacobian, the default), "P"
    (pseudo-inverse) or "I" (inverse). ``variants``: alternative rules to prefer, e.g.
    ``("hadamard",)`` for the activation feedback of paper 002 eq. 29; rules are chosen separately
    for error modes and target modes (:data:`DEFAULT_VARIANTS`, :func:`family_variants`): a tuple is
    added to both families' defaults, a dict ``{"error": (...), "target": (...)}`` replaces the named
    families' variants (``variants={"error": ()}``: frozen normalisation statistics in error modes
    too); ``explain()`` shows the rule of each family. ``units``: how nodes group
    into TP units ("layer", "op", "module", ("module", depth) or a callable node -> key).
    ``kwargs``: constant values for ``forward`` arguments after the example inputs (the others
    keep their defaults). ``frontend``: "fx" (torch.fx tracing), "export" (torch.export, training IR,
    the model's current train/eval mode) or "auto" (fx, else export; :mod:`fbcompile.frontends`).
    ``backend``: a ``torch.compile`` backend (e.g. "inductor") for the generated feedback modules,
    compiled at their first use (:mod:`fbcompile.backends`: faster steps on real-size nets, paid in
    compile time and in the taps' lifetime); None runs them as generated Python.
    Raises :class:`~fbcompile.errors.UnsupportedOpError` listing every unsupported node at once.
    """
    backend = check_backend(backend)
    start = _start(model, example_inputs, condition, variants, units, kwargs, frontend)
    program = run_passes(PASSES, start).program
    program.backend = backend
    return program


def compile_traced(model, traced, condition, variants, units) -> FeedbackProgram:
    """Compile an already traced model (also used to change condition, variants or units cheaply):
    the passes after canonicalization."""
    _check_condition(condition)
    _check_variants(variants)
    start = Compilation(model, (), condition, family_variants(variants), units, traced=traced)
    return run_passes(PASSES[_ANALYSIS - 1:], start).program


def coverage(model: nn.Module, example_inputs, *, condition: str = "T", variants=(), kwargs: dict | None = None,
             frontend: str = "auto") -> list:
    """Every node of ``model`` that has no feedback rule under ``condition``, found before compiling
    (empty when everything is supported). Raises only if the model cannot be traced at all."""
    start = _start(model, example_inputs, condition, variants, "layer", kwargs, frontend)
    return list(run_passes(PASSES[:_ANALYSIS], start).problems)


def _start(model, example_inputs, condition, variants, units, kwargs, frontend="auto") -> Compilation:
    _check_condition(condition)
    _check_variants(variants)
    check_frontend(frontend)
    return replace(Compilation(model, as_tuple(example_inputs), condition, family_variants(variants), units, kwargs),
                   frontend=frontend)


#: Rule variants each mode family prefers unless ``compile(variants={family: ...})`` says otherwise.
#: Error modes (bp, fa, dfa, sdfa, drtp and every learner's error path) differentiate through the
#: normalisation statistics (BatchNorm, LayerNorm, GroupNorm), so ``bp`` equals autograd in train
#: mode; target modes (TP, DTP) keep paper 002's frozen statistics (the rules' default).
DEFAULT_VARIANTS = {"error": ("exact-statistics",), "target": ()}


def family_variants(variants) -> dict:
    """``{family: variants}`` for the mode families of :data:`DEFAULT_VARIANTS`. A tuple is preferred
    in every family, before the family's defaults; a dict gives the named families' variants exactly
    (their defaults dropped), the others keep their defaults. Idempotent."""
    if isinstance(variants, dict):
        unknown = [f for f in variants if f not in DEFAULT_VARIANTS]
        if unknown:
            raise OptionError(f"variants has mode famil(ies) {', '.join(map(repr, unknown))}; the families are "
                              f"{choices_text(tuple(DEFAULT_VARIANTS))}")
        if any(isinstance(v, str) for v in variants.values()):
            raise OptionError(f"variants={variants!r}: each family takes a tuple of names, e.g. "
                              "{'error': ('exact-statistics',)}")
        return {f: tuple(variants.get(f, DEFAULT_VARIANTS[f])) for f in DEFAULT_VARIANTS}
    return {f: tuple(dict.fromkeys(tuple(variants) + d)) for f, d in DEFAULT_VARIANTS.items()}


def select_rule_families(traced: fx.GraphModule, condition: str, families: dict) -> tuple[dict, list]:
    """``({family: {node: rule}}, problems)``; a node without a rule in any family is a problem once."""
    rules, problems, seen = {}, [], set()
    for family, variants in families.items():
        rules[family], found = select_rules(traced, condition, variants)
        problems.extend(p for p in found if p.node not in seen)
        seen.update(p.node for p in found)
    return rules, problems


def select_rules(traced: fx.GraphModule, condition: str, variants=()) -> tuple[dict, list]:
    """One family's ``({node: rule}, problems)`` with ``variants`` preferred."""
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
                reason = reason or _complex_refusal(node, rule)
                rules[node] = rule
        if reason is not None:
            canonical = record.call.spec.name if record.call is not None else ""
            problems.append(Unsupported(node.name, node.op, _target_name(node), reason, record.source, canonical))
    return rules, problems


def _complex_refusal(node: fx.Node, rule) -> str | None:
    """Why ``rule`` cannot serve ``node``: it holds complex values and the rule is written for real
    ones (a product's transpose would miss its conjugation), else None."""
    record = info(node)
    values = [record.dtype, *(info(arg).dtype for _, _, arg in record.call.active)]
    if rule.complex_values or not any(d is not None and d.is_complex for d in values):
        return None
    return (f"op {record.call.spec.name!r} on complex values: its rule {rule.name!r} is written for real tensors; "
            "complex values are supported through torch.fft, real / imag, view_as_real / view_as_complex, "
            "torch.complex and the ops whose rule is autograd's vjp")


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
    named = [v for family in family_variants(variants).values() for v in family]
    unknown = list(dict.fromkeys(v for v in named if v not in known))
    if unknown:
        raise OptionError(f"unknown rule variant(s) {', '.join(map(repr, unknown))}; registered variants: "
                          f"{choices_text(known)}")


def _check_condition(condition: str) -> None:
    if condition not in CONDITIONS:
        raise OptionError(f"condition={condition!r} is not a Jacobian matching condition; use "
                          f"{choices_text(CONDITIONS)}")
