"""Ops whose T rule is autograd's vjp at the forward values (rules/vjp_ops.py), in float64 through
both front ends: every rule's TJML residual and adjoint gap with random vectors, input and
parameter gradients equal to autograd's (PReLU's slopes, RMSNorm's gain), ties of maximum shared as
autograd shares them, and DTP's small-beta limit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile

from helpers import randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "var": lambda m, h: h - h.var(-1, keepdim=True),
    "std": lambda m, h: h / (torch.std(h, dim=1, keepdim=True, correction=0) + 1.0),
    "logsumexp": lambda m, h: h - torch.logsumexp(h, -1, keepdim=True),
    "cumsum": lambda m, h: torch.cumsum(h, 1),
    "square": lambda m, h: torch.square(h),
    "selu": lambda m, h: F.selu(h),
    "celu": lambda m, h: F.celu(h, 0.7),
    "logsigmoid": lambda m, h: F.logsigmoid(h),
    "glu": lambda m, h: F.glu(torch.cat([h, torch.tanh(h)], -1)),
    "prelu": lambda m, h: m.prelu(h),
    "rms_norm": lambda m, h: m.rms(h),
    "pixel_shuffle": lambda m, h: F.pixel_shuffle(h.view(-1, 4, 1, 2), 2).flatten(1),
    "pixel_unshuffle": lambda m, h: F.pixel_unshuffle(h.view(-1, 2, 2, 2), 2).flatten(1),
    "maximum": lambda m, h: torch.maximum(h, torch.tanh(h.flip(-1))),
    "minimum": lambda m, h: torch.minimum(h, 0.5 * h.roll(1, -1)),
}


class Case(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.prelu, self.rms = nn.PReLU(8), nn.RMSNorm(8)
        self.fn = fn

    def forward(self, x):
        return self.b(self.fn(self, self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_vjp_ops_equal_autograd(name, frontend):
    model = randomise_vectors(Case(CASES[name]).double())
    with torch.no_grad():
        model.prelu.weight.uniform_(0.1, 0.4)
    ops = [] if (frontend, name) in {("export", "square")} else [name]      # ATen writes square as pow
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend, ops=ops)


@pytest.mark.parametrize("name", ["var", "logsumexp", "prelu", "rms_norm", "maximum", "glu"])
def test_vjp_ops_meet_the_small_beta_limit(name):
    model = randomise_vectors(Case(CASES[name]))
    assert dtp_angle(model, torch.randn(5, 4, dtype=torch.float64)) < 0.01


def test_ties_of_maximum_share_the_feedback_as_autograd_does():
    class Max(nn.Module):
        def forward(self, a):
            return torch.maximum(a, a.flip(-1))

    x = torch.tensor([[1.0, 2.0, 2.0, 1.0], [0.5, -1.0, 3.0, 0.5]], dtype=torch.float64)
    program = fbcompile.compile(Max(), x)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    expected = torch.autograd.grad(Max()(x.requires_grad_()), x, g)[0]
    assert torch.equal(program.propagate_error(x.detach(), g), expected)
