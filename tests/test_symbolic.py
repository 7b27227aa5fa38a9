"""The sympy derivation of activation feedback (paper 002 eq. 27), float64: varsigma'(sigma(x)) =
sigma'(x), varsigma continuous with varsigma(sigma(0)) = 0, the known inverses invert, the derived
sigma' equals torch's backward kernels, derivation is fast from a cold cache, and nothing calls
sympy.solve."""
import pathlib
import re
import time

import pytest
import sympy
import torch

from fbcompile import symbolic
from fbcompile.rules.activation import ACTIVATIONS, KERNELS

INVERTIBLE = [("tanh", {}), ("sigmoid", {}), ("leaky_relu", {"negative_slope": 0.01}),
              ("leaky_relu", {"negative_slope": 0.3}), ("elu", {"alpha": 1.0}), ("elu", {"alpha": 0.4}),
              ("softplus", {"beta": 1.0, "threshold": 20.0}), ("softplus", {"beta": 2.5, "threshold": 30.0})]
ALL = INVERTIBLE + [("relu", {}), ("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}),
                    ("silu", {}), ("hardtanh", {"min_val": -1.0, "max_val": 1.0}),
                    ("hardtanh", {"min_val": -0.3, "max_val": 2.0})]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def derive(name, constants):
    strings = {k: v for k, v in constants.items() if isinstance(v, str)}
    numeric = {k: v for k, v in constants.items() if not isinstance(v, str)}
    suffix = "".join(f"_{v}" for v in strings.values())
    return symbolic.derive(name + suffix, ACTIVATIONS[name][1](**strings), **numeric)


def forward(name, constants):
    return lambda t: ACTIVATIONS[name][0](t, **constants)


def points(name, constants):
    """Random operating points covering every branch (never exactly on a boundary)."""
    x = 3 * torch.randn(400, dtype=torch.float64)
    if name == "softplus":
        x = torch.cat([x, constants["threshold"] / constants["beta"] + torch.rand(50, dtype=torch.float64)])
    return x[x.abs() > 1e-3]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name,constants", INVERTIBLE, ids=lambda v: str(v))
def test_varsigma_prime_at_output_is_sigma_prime_at_input(name, constants):
    d = derive(name, constants)
    x = points(name, constants)
    h = forward(name, constants)(x)
    hh = h.clone().requires_grad_()
    slope, = torch.autograd.grad(d.varsigma(hh).sum(), hh)
    xx = x.clone().requires_grad_()
    sigma_prime, = torch.autograd.grad(forward(name, constants)(xx).sum(), xx)
    assert rel(slope, sigma_prime) < 1e-10
    assert rel(d.derivative_at_output(h), sigma_prime) < 1e-10


@pytest.mark.parametrize("name,constants", INVERTIBLE, ids=lambda v: str(v))
def test_varsigma_zero_at_sigma_zero_and_inverse_inverts(name, constants):
    d = derive(name, constants)
    zero = forward(name, constants)(torch.zeros(1, dtype=torch.float64))
    assert float(d.varsigma(zero).abs()) < 1e-15
    x = points(name, constants).clamp(-8, 30)     # sigmoid/tanh saturate beyond: no inverse in float64
    assert torch.allclose(d.inverse(forward(name, constants)(x)), x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,constants", [c for c in INVERTIBLE if c[0] in ("leaky_relu", "elu", "softplus")],
                         ids=lambda v: str(v))
def test_varsigma_is_continuous_across_branches(name, constants):
    d = derive(name, constants)
    boundaries = [sympy.sympify(c.rhs) for _, c in d.expressions["varsigma"].args if c is not sympy.true]
    assert boundaries
    for b in boundaries:
        branches = [e for e, _ in d.expressions["varsigma"].args]
        values = [float(e.subs(symbolic.y, b)) for e in branches]
        assert max(values) - min(values) < 1e-12 * (1 + abs(values[0]))     # symbolically joined
        for eps in (1e-4, 1e-7):
            around = torch.tensor([float(b) - eps, float(b) + eps], dtype=torch.float64)
            step = d.varsigma(around)
            assert float((step[1] - step[0]).abs()) < 2.5 * eps     # slope <= 1 for these activations


@pytest.mark.parametrize("name,constants", ALL, ids=lambda v: str(v))
def test_sympy_derivative_equals_torch_backward_kernel(name, constants):
    d = derive(name, constants)
    x = points(name, constants)
    y = forward(name, constants)(x)
    kernel = KERNELS[name](torch.ones_like(x), x, y, constants)
    assert rel(d.derivative(x), kernel) < 1e-10
    assert rel(d.forward(x), y) < 1e-12


def test_derivation_from_a_cold_cache_is_fast():
    symbolic._derive.cache_clear()
    start = time.perf_counter()
    for name, constants in ALL:
        derive(name, constants)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"deriving every activation took {elapsed:.2f} s"
    assert symbolic._derive.cache_info().currsize == len(ALL)


def test_non_invertible_activations_have_no_varsigma():
    for name, constants in ALL[len(INVERTIBLE):]:
        assert derive(name, constants).varsigma is None


def test_to_torch_runs_on_proxies_and_under_torch_func():
    d = derive("elu", {"alpha": 0.5})
    h = torch.randn(6, dtype=torch.float64)
    jac = torch.func.jacrev(d.varsigma)(h)
    assert torch.allclose(jac, torch.diag(d.derivative_at_output(h)))
    gm = torch.fx.symbolic_trace(lambda t: d.varsigma(t))
    assert torch.allclose(gm(h), d.varsigma(h))


def test_no_sympy_solve_anywhere():
    """Neither ``sympy.solve*(...)`` calls nor solvers imported from sympy (torch.linalg.solve is fine)."""
    pattern = re.compile(r"sympy\.\w*solve\w*\s*\(|from sympy[\w.]* import .*solve")
    offenders = [f"{path.relative_to(ROOT)}:{i}" for folder in ("fbcompile", "rules")
                 for path in (ROOT / folder).rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def _where_reference(expr, t):
    """Piecewise evaluated branch by branch with masks (the definition, independent of to_torch), by
    numpy on the CPU (the CPU as default device too: torch.as_tensor makes its tensors there); returned
    on ``t``'s device."""
    with torch.device("cpu"):
        out = _where_reference_cpu(expr, t.cpu())
    return out.to(t.device)


def _where_reference_cpu(expr, t):
    out, taken = torch.full_like(t, float("nan")), torch.zeros_like(t, dtype=torch.bool)
    if not isinstance(expr, sympy.Piecewise):
        return out.copy_(torch.as_tensor(sympy.lambdify(symbolic.x, expr, "numpy")(t.numpy()), dtype=t.dtype))
    for branch, condition in expr.args:
        mask = ~taken & (torch.ones_like(taken) if condition is sympy.true
                         else torch.from_numpy(sympy.lambdify(symbolic.x, condition, "numpy")(t.numpy())))
        value = torch.as_tensor(sympy.lambdify(symbolic.x, branch, "numpy")(t[mask].numpy()), dtype=t.dtype)
        out[mask], taken = value, taken | mask
    return out


@pytest.mark.parametrize("expr, clamped", [
    (sympy.Piecewise((symbolic.x, symbolic.x > 0), (sympy.Rational(1, 5) * symbolic.x, True)), True),
    (sympy.Piecewise((sympy.exp(symbolic.x) - 1, symbolic.x < 0), (symbolic.x, symbolic.x < 2),
                     (2 + (symbolic.x - 2) ** 2 / 3, True)), True),              # three branches, "<" chain
    (sympy.Piecewise((symbolic.x + 1, symbolic.x > 0), (symbolic.x, True)), False),   # jump: torch.where
])
def test_piecewise_code_matches_the_definition_and_ignores_unselected_overflow(expr, clamped):
    function = symbolic.to_torch(expr, symbolic.x, "piecewise_case")
    assert ("torch.where" in function.source) is not clamped
    ties = torch.tensor([0.0, 2.0], dtype=torch.float64)      # the thresholds: one-sided derivatives
    t = torch.cat([5 * torch.randn(500, dtype=torch.float64), ties,
                   torch.tensor([800.0, -800.0], dtype=torch.float64)]).requires_grad_(True)
    expected = _where_reference(expr, t.detach())
    finite = torch.isfinite(expected)
    value = function(t)
    assert torch.allclose(value[finite], expected[finite], rtol=1e-13, atol=1e-13)
    (slope,) = torch.autograd.grad(value[finite].sum(), t)
    expected_slope = _where_reference(sympy.diff(expr, symbolic.x), t.detach())
    assert torch.allclose(slope[finite], expected_slope[finite], rtol=1e-12, atol=1e-12)
