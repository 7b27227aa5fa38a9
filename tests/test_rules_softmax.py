"""Softmax and log-softmax rules (float64): T is J_F^T for every dim and spelling (adjoint identity
with random vectors, dense TJML, error mode == autograd), P is the derived pseudo-inverse (dense
PJML, also with an underflowed probability), I is refused, the linearised target map's Jacobian at
the operating point is the error map, and analytic DTP with a tiny beta is BP."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import jacrev

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.verify.checks import rule_errors
from fbcompile.verify.evaluate import forward_values

from helpers import compare_with_autograd

TOL = 1e-10

SPELLINGS = {
    "softmax": [lambda x, d: F.softmax(x, d), lambda x, d: torch.softmax(x, d), lambda x, d: x.softmax(d),
                lambda x, d: F.softmax(x, dim=d, dtype=torch.float64), lambda x, d: torch.softmax(x, d, torch.float64),
                lambda x, d: torch.special.softmax(x, d), None],
    "log_softmax": [lambda x, d: F.log_softmax(x, d), lambda x, d: torch.log_softmax(x, d),
                    lambda x, d: x.log_softmax(d, dtype=torch.float64), None],
}   # None: the module, nn.Softmax(dim) / nn.LogSoftmax(dim)


class Functional(nn.Module):
    def __init__(self, spelling, dim):
        super().__init__()
        self.spelling, self.dim = spelling, dim

    def forward(self, x):
        return self.spelling(x, self.dim)


def _module_spelling(op, dim):
    """nn.Softmax(dim) / nn.LogSoftmax(dim) inside the model (a leaf call_module)."""
    return nn.Sequential(nn.Softmax(dim) if op == "softmax" else nn.LogSoftmax(dim))


@st.composite
def cases(draw):
    """A spelling, a shape, a dim and logits |x| < 4, drawn from a seed Hypothesis chooses (so a
    failure replays). The bound keeps every probability above e^-8 / 4 ~ 1e-4: at a saturated
    probability p the adjoint identity itself cannot be checked to 1e-10 in float64 (J_F's entries
    are ~p, and the cancellation in p (v - <p, v>) costs ~1e-16 / p relative, in autograd's own vjp
    too: 5e-10 at p = 5e-8). Saturated rows are covered by the underflow test below."""
    op = draw(st.sampled_from(sorted(SPELLINGS)))
    spelling = draw(st.sampled_from(SPELLINGS[op]))
    shape = tuple(draw(st.integers(2, 4)) for _ in range(draw(st.integers(2, 4))))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    model = _module_spelling(op, dim) if spelling is None else Functional(spelling, dim)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    logits = torch.tanh(torch.randn(*shape, dtype=torch.float64, generator=generator))
    return model, op, draw(st.floats(0.1, 4.0)) * logits


@settings(max_examples=30, deadline=None)
@given(cases())
def test_transpose_rule_is_exact_for_every_dim_and_spelling(case):
    model, op, x = case
    program = fbcompile.compile(model, x)
    node = next(iter(program.rules))
    assert program.rules[node].op == op
    assert program.rules[node].kind_for(EagerContext(node, {}, model)) == "linearised"
    (tjml_rel, gap), = rule_errors(program, x).values()
    assert tjml_rel < TOL and gap < TOL
    assert max(compare_with_autograd(model, x, program=program)) < TOL


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["softmax", "log_softmax"]), st.integers(1, 2), st.floats(0.1, 2.0))
def test_pinv_rule_is_the_pseudo_inverse(op, dim, scale):
    """Against torch.linalg.pinv of the dense J_F; logits of moderate spread keep J_F's condition
    number (about 1 / min s) small enough for the SVD reference itself to be accurate."""
    model = _module_spelling(op, dim)
    x = scale * torch.randn(3, 4, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x, condition="P")
    row = fbcompile.verify(program, x).rows[0]
    assert row["kind"] == "linearised" and row["pjml_rel"] < 1e-9


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_pinv_with_an_underflowed_probability(op):
    """Logits 800 apart: exp underflows, s_i = 0 exactly, and J has a zero row and column; the
    pseudo-inverse restricted to the support is still exact."""
    x = torch.randn(3, 5, dtype=torch.float64)
    x[:, 0] -= 800.0
    model = _module_spelling(op, 1)
    assert bool((torch.softmax(x, 1)[:, 0] == 0).all())
    program = fbcompile.compile(model, x, condition="P")
    row = fbcompile.verify(program, x).rows[0]
    assert row["pjml_rel"] < 1e-9


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_condition_i_is_refused_with_the_reason(op):
    with pytest.raises(fbcompile.FBCompileError, match="singular"):
        fbcompile.compile(_module_spelling(op, -1), torch.randn(2, 4, dtype=torch.float64), condition="I")


@pytest.mark.parametrize("condition", ["T", "P"])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_target_map_jacobian_at_the_operating_point_is_the_error_map(op, condition):
    model = _module_spelling(op, 1)
    x = 2 * torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, condition=condition)
    node = next(iter(program.rules))
    rule, ctx = program.rules[node], EagerContext(node, forward_values(program, (x,)), model)
    h = model(x).detach()
    j_target = jacrev(lambda t: rule.target_map()(ctx, t)["input"])(h).reshape(12, 12)
    j_error = jacrev(lambda g: rule.error(ctx, g)["input"])(torch.zeros_like(h)).reshape(12, 12)
    assert torch.allclose(j_target, j_error, rtol=1e-12, atol=1e-12)
    assert torch.allclose(rule.target_map()(ctx, h)["input"], x, rtol=1e-12, atol=1e-12)


class Attention(nn.Module):
    """Scores by a linear map, softmax over the last dim, mixing by another linear map."""

    def __init__(self):
        super().__init__()
        self.scores, self.mix, self.out = nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        weights = torch.softmax(self.scores(x), dim=-1)
        return self.out(torch.log_softmax(self.mix(weights), -1) + x)


def test_analytic_dtp_with_tiny_beta_is_bp():
    """The linearised target maps are affine, so DTP's difference correction is J^T (t - h)."""
    model = Attention().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp", beta=1e-6)
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[name], rtol=1e-5, atol=1e-9), name
