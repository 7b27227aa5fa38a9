"""Symbolic derivation of activation feedback with sympy, evaluated with torch.

For an invertible elementwise activation y = sigma(x), the feedback that satisfies the transposed
Jacobian matching condition is (paper 002, eq. 27)

    varsigma(y) = integral of sigma'(sigma^-1(y)) dy,

so that varsigma'(h) = sigma'(x) at the operating point h = sigma(x): J_G = diag(sigma'(x)) = J_F^T.
:func:`derive` builds sigma'(x), sigma^-1(y), sigma'(sigma^-1(y)) and varsigma(y) from the
activation's branches and their *known* inverses (no ``sympy.solve``: it can run for minutes),
integrating branch by branch and choosing the constants so that varsigma is continuous and
varsigma(sigma(0)) = 0. Results are cached per activation and hyperparameters. :func:`to_torch` turns an expression into a function of one tensor built from
torch operations, which also works on fx proxies and under ``torch.func`` transforms.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import sympy
import torch

from .errors import RuleError

x, y = sympy.symbols("x y", real=True)


class sigmoid(sympy.Function):
    """The logistic function as one symbol, so expressions using it (SiLU) differentiate to
    sigmoid(x) (1 - sigmoid(x)) and evaluate with ``torch.sigmoid`` (no exp overflow)."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))


class softplus(sympy.Function):
    """log(1 + e^x) as one symbol (Mish): it differentiates to sigmoid(x) and evaluates with
    ``torch.nn.functional.softplus``, which neither overflows for large x nor loses small ones."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


@dataclass(frozen=True)
class Piece:
    """One branch of an activation: ``forward`` (in x) where ``where`` (a condition on x) holds and,
    for invertible activations, its ``inverse`` (in y) for outputs above ``above`` (None: the lowest
    branch). Branches are listed from the highest outputs down; the first whose condition holds wins.
    ``increasing`` is the condition on the hyperparameters under which the branch is strictly
    increasing (leaky ReLU's ``negative_slope > 0``): only then does ``inverse`` invert it, and an
    activation is invertible only if every branch is increasing and they join without a jump."""
    forward: sympy.Expr
    where: sympy.Basic = sympy.true
    inverse: sympy.Expr | None = None
    above: sympy.Expr | None = None
    increasing: sympy.Basic = sympy.true


@dataclass(frozen=True)
class Derived:
    """Torch callables for one activation: sigma'(x), sigma'(sigma^-1(y)) (= varsigma'(y)), the
    inverse and varsigma. The last three are ``None`` for non-invertible activations."""
    name: str
    forward: Callable
    derivative: Callable
    derivative_at_output: Callable | None
    inverse: Callable | None
    varsigma: Callable | None
    expressions: dict

    @property
    def varsigma_is_forward(self) -> bool:
        """Whether varsigma is sigma itself (piecewise-linear activations such as leaky ReLU), so
        the target can use the activation's own fused kernel."""
        e = self.expressions
        return "varsigma" in e and e["varsigma"].subs(y, x) == e["forward"]


def derive(name: str, pieces: tuple, **constants) -> Derived:
    """Derive the feedback functions of the activation made of ``pieces`` (see :class:`Piece`);
    ``constants`` give values to hyperparameter symbols (negative_slope, alpha, beta). Cached."""
    return _derive(name, tuple(pieces), tuple(sorted(constants.items())))


@functools.lru_cache(maxsize=None)
def _derive(name: str, pieces: tuple, constants: tuple) -> Derived:
    subs = {sympy.Symbol(k, real=True): sympy.nsimplify(v) for k, v in constants}
    pieces = [Piece(*(sympy.sympify(part).subs(subs) if part is not None else None
                      for part in (p.forward, p.where, p.inverse, p.above, p.increasing))) for p in pieces]
    forward = _piecewise([(p.forward, p.where) for p in pieces])
    derivative = _piecewise([(sympy.diff(p.forward, x), p.where) for p in pieces])
    exprs = {"forward": forward, "derivative": derivative}
    fns = {"forward": to_torch(forward, x, name), "derivative": to_torch(derivative, x, f"{name}_derivative")}
    if _invertible(pieces):
        at_y = [sympy.simplify(sympy.diff(p.forward, x).subs(x, p.inverse)) for p in pieces]
        integrals = _continuous_antiderivative(pieces, at_y, forward.subs(x, 0))
        conditions = [y > p.above if p.above is not None else sympy.true for p in pieces]
        for key, parts in (("inverse", [p.inverse for p in pieces]), ("derivative_at_output", at_y),
                           ("varsigma", integrals)):
            exprs[key] = _piecewise(list(zip(parts, conditions)))
            fns[key] = to_torch(exprs[key], y, f"{name}_{key}")
    return Derived(name, fns["forward"], fns["derivative"], fns.get("derivative_at_output"),
                   fns.get("inverse"), fns.get("varsigma"), exprs)


def _invertible(pieces) -> bool:
    """Every branch has an inverse and is increasing for these hyperparameters (checked first: with
    ``negative_slope = 0`` the inverse y / slope is undefined), and the branches join injectively."""
    return (all(p.inverse is not None and p.increasing is sympy.true for p in pieces)
            and _injective(pieces))


def _injective(pieces, tolerance: float = 1e-8) -> bool:
    """Whether consecutive branches join without a jump: at the output ``b`` where branch i starts,
    the next branch must reach ``b`` at the same x, |sigma_{i+1}(sigma_i^-1(b)) - b| <= tol max(1, |b|).
    torch's softplus with a small threshold jumps (by log(1 + e^-threshold) / beta), so some outputs
    have two preimages and no inverse exists; such an activation is treated as non-invertible."""
    for upper, lower in zip(pieces, pieces[1:]):
        b = upper.above
        joined = lower.forward.subs(x, upper.inverse.subs(y, b))
        if abs(float(joined - b)) > tolerance * max(1.0, abs(float(b))):
            return False
    return True


def _continuous_antiderivative(pieces, at_y, zero_output) -> list:
    """Antiderivatives of ``at_y`` per branch with constants making the whole continuous across
    the branch boundaries and zero at sigma(0)."""
    antis = [sympy.integrate(expr, y) for expr in at_y]
    home = next(i for i, p in enumerate(pieces) if p.above is None or bool(zero_output > p.above))
    antis[home] -= antis[home].subs(y, zero_output)
    for i in range(home - 1, -1, -1):           # branches above the home branch
        b = pieces[i].above
        antis[i] += antis[i + 1].subs(y, b) - antis[i].subs(y, b)
    for i in range(home + 1, len(pieces)):      # branches below it
        b = pieces[i - 1].above
        antis[i] += antis[i - 1].subs(y, b) - antis[i].subs(y, b)
    return [sympy.expand(a) if a.is_polynomial(y) else a for a in antis]


def _piecewise(branches: list) -> sympy.Expr:
    if len(branches) == 1:
        return branches[0][0]
    return sympy.Piecewise(*branches[:-1], (branches[-1][0], True))


def to_torch(expr: sympy.Expr, symbol: sympy.Symbol, name: str = "sympy_fn") -> Callable:
    """A function ``f(tensor) -> tensor`` evaluating ``expr`` at ``symbol = tensor`` elementwise.

    The expression is printed once as straight-line torch code and compiled, so a call costs only
    the tensor operations (this runs in every training step)."""
    clamped = _clamped_form(expr, symbol)
    if clamped is None:
        source = f"def {name}(t):\n    return {_as_tensor_code(_code(expr, symbol))}\n"
    else:
        branches, offset = clamped
        lines = [line for i, (_, lo, hi) in enumerate(branches) for line in _clamp_lines(f"t_{i}", lo, hi)]
        terms = [_as_tensor_code(_code(b.subs(symbol, sympy.Symbol(f"t_{i}")), symbol))
                 for i, (b, _, _) in enumerate(branches)]
        shift = f" - {offset!r}" if offset else ""
        source = f"def {name}(t):\n" + "\n".join(lines) + f"\n    return {' + '.join(terms)}{shift}\n"
    namespace = {"torch": torch}
    exec(compile(source, f"<fbcompile.symbolic {name}>", "exec"), namespace)
    function = namespace[name]
    function.__module__ = __name__
    function.__qualname__ = name
    function.expression = expr
    function.source = source
    return function


def _as_tensor_code(code: str) -> str:
    """Constants become full tensors shaped like the argument ``t``."""
    try:
        float(code)
    except ValueError:
        return code
    return f"torch.full_like(t, {code})"


def _code(node, symbol) -> str:
    """Python source computing ``node`` from the tensor ``t`` with torch functions."""
    if node == symbol:
        return "t"
    if isinstance(node, sympy.Symbol):       # a local of the generated function (see _clamped_form)
        return node.name
    if not node.free_symbols:                 # constant subexpressions are folded (log(2), sqrt(2))
        return repr(float(node))
    if isinstance(node, sympy.Add):
        expm1 = _expm1_form(node)
        if expm1 is not None:
            sign, argument = expm1
            return f"({sign!r} * torch.expm1({_as_tensor_code(_code(argument, symbol))}))"
        return "(" + " + ".join(_code(a, symbol) for a in node.args) + ")"
    if isinstance(node, sympy.Mul):
        return "(" + " * ".join(_code(a, symbol) for a in node.args) + ")"
    if isinstance(node, sympy.Pow):
        base = _code(node.base, symbol)
        if node.exp == sympy.Rational(1, 2):
            return f"torch.sqrt({_as_tensor_code(base)})"
        exponent = int(node.exp) if node.exp.is_Integer else _code(node.exp, symbol)
        return f"({base} ** {exponent})"
    if isinstance(node, sympy.Piecewise):
        result = None
        for branch, condition in reversed(node.args):
            value = _as_tensor_code(_code(branch, symbol))
            result = value if condition is sympy.true else f"torch.where({_condition_code(condition, symbol)}, {value}, {result})"
        return result
    name = _FUNCTIONS.get(type(node))
    if name is None:
        raise RuleError(f"no torch translation for {type(node).__name__} in {node}")
    return f"torch.{name}(" + ", ".join(_as_tensor_code(_code(a, symbol)) for a in node.args) + ")"


def _clamped_form(expr, symbol):
    """A continuous piecewise function of threshold conditions as a sum of clamped branches.

    For f = e_0 on its interval I_0, e_1 on I_1, ... split at thresholds c_0, c_1, ... (conditions
    ``t > c`` with c decreasing, or ``t < c`` with c increasing) and continuous at every threshold,
    f(t) = sum_i e_i(clamp(t, I_i)) - sum_{i>=1} e_i(c_{i-1}): at t in I_k, every other branch sits
    at its end nearest I_k, and continuity makes those constants telescope to the subtracted sum.
    This replaces torch.where (several times slower than arithmetic on CPU) and evaluates each
    branch only inside its own interval (no inf or nan from an unselected branch). Returns
    ``([(e_i, (lo_i, owns_lo), (hi_i, owns_hi))], offset)``, or None when f is not of that form;
    ``owns`` says whether t = bound belongs to the branch (its derivative is taken there)."""
    if not isinstance(expr, sympy.Piecewise) or expr.args[-1][1] is not sympy.true:
        return None
    thresholds, strict, direction = [], [], None
    for _, condition in expr.args[:-1]:
        kind = type(condition)
        if kind not in _RELATIONS or condition.lhs != symbol or condition.rhs.free_symbols:
            return None
        upward = kind in (sympy.StrictGreaterThan, sympy.GreaterThan)
        if direction not in (None, upward):
            return None
        direction = upward
        thresholds.append(float(condition.rhs))
        strict.append(kind in (sympy.StrictGreaterThan, sympy.StrictLessThan))
    ordered = sorted(thresholds, reverse=direction)
    if ordered != thresholds or len(set(thresholds)) != len(thresholds):
        return None
    branches = [branch for branch, _ in expr.args]
    offset = 0.0
    for i, c in enumerate(thresholds):
        left, right = (complex(branches[j].subs(symbol, c).evalf()) for j in (i, i + 1))
        if not (math.isfinite(abs(left)) and abs(left - right) <= 1e-12 * max(1.0, abs(left))) or left.imag:
            return None
        offset += right.real
    owner = [i + 1 if s else i for i, s in enumerate(strict)]     # the branch that owns t = c_i
    result = []
    for i, branch in enumerate(branches):
        near, far = (i, i - 1) if direction else (i - 1, i)          # thresholds below / above I_i
        lo = (thresholds[near], owner[near] == i) if 0 <= near < len(thresholds) else None
        hi = (thresholds[far], owner[far] == i) if 0 <= far < len(thresholds) else None
        result.append((branch, lo, hi))
    return result, offset


def _clamp_lines(name: str, lo, hi) -> list:
    """Statements clamping ``t`` into [lo, hi] as ``name``, built from relu so that at t = bound
    the derivative is 1 where the branch owns the bound and 0 where it does not (torch.clamp
    passes the gradient on both sides of a tie, which would count a kink twice)."""
    lines, value = [], "t"
    if lo is not None:
        bound, owned = lo
        lines.append(f"    {name} = {value} + torch.relu({bound!r} - {value})" if owned
                     else f"    {name} = {bound!r} + torch.relu({value} - {bound!r})")
        value = name
    if hi is not None:
        bound, owned = hi
        lines.append(f"    {name} = {value} - torch.relu({value} - {bound!r})" if owned
                     else f"    {name} = {bound!r} - torch.relu({bound!r} - {value})")
    return lines


def _condition_code(condition, symbol) -> str:
    if isinstance(condition, (sympy.And, sympy.Or)):
        joiner = " & " if isinstance(condition, sympy.And) else " | "
        return "(" + joiner.join(_condition_code(c, symbol) for c in condition.args) + ")"
    operator_text = _RELATIONS[type(condition)]
    return f"({_as_tensor_code(_code(condition.lhs, symbol))} {operator_text} {_code(condition.rhs, symbol)})"


def _expm1_form(node: sympy.Add):
    """``exp(u) - 1`` or ``1 - exp(u)`` as (sign, u), evaluated with expm1 to avoid cancellation."""
    if len(node.args) != 2:
        return None
    one = [a for a in node.args if a in (sympy.Integer(1), sympy.Integer(-1))]
    rest = [a for a in node.args if a not in one]
    if len(one) != 1 or len(rest) != 1:
        return None
    term, constant = rest[0], one[0]
    if isinstance(term, sympy.exp) and constant == -1:
        return 1.0, term.args[0]
    if constant == 1 and term.could_extract_minus_sign() and isinstance(-term, sympy.exp):
        return -1.0, (-term).args[0]
    return None


_FUNCTIONS = {
    sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", sympy.atanh: "atanh", sympy.erf: "erf",
    sympy.sqrt: "sqrt", sympy.Abs: "abs", sympy.sign: "sign", sigmoid: "sigmoid",
    softplus: "nn.functional.softplus",
}
_RELATIONS = {
    sympy.StrictGreaterThan: ">", sympy.GreaterThan: ">=", sympy.StrictLessThan: "<", sympy.LessThan: "<=",
}
