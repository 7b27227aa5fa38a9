"""Fractional max pooling (float64): the forward draws the window offsets the model draws under one
seed, T is exact and equals autograd (module, functional and with-indices spellings, 2d and 3d,
fx and torch.export), P is exact, I is refused, and every learner steps on a CNN that uses it."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.verify.checks import rule_errors
from helpers import assert_a_step_learns, assert_equals_autograd_under_one_seed
from test_learners_any_model import LEARNERS, loss_fn

TOL = 1e-10


class Fractional(nn.Module):
    """conv -> fractional max pool (one of its spellings) -> tanh -> linear."""

    def __init__(self, n, spelling, kernel_size, size, output_ratio=None, output_size=None):
        super().__init__()
        self.n, self.spelling = n, spelling
        ratio = None if output_ratio is None else (output_ratio,) * n       # F's own spelling needs a tuple
        self.geometry = dict(kernel_size=kernel_size, output_ratio=ratio, output_size=output_size)
        self.conv = (nn.Conv2d if n == 2 else nn.Conv3d)(2, 3, 1)
        self.pool = (nn.FractionalMaxPool2d if n == 2 else nn.FractionalMaxPool3d)(
            return_indices=spelling == "module_with_indices", **self.geometry)
        with torch.no_grad():
            pooled = self._pool(torch.zeros(1, 3, *(size,) * n))
        self.head = nn.Linear(pooled.numel(), 4)

    def _pool(self, h):
        function = F.fractional_max_pool2d if self.n == 2 else F.fractional_max_pool3d
        if self.spelling == "functional":
            return function(h, **self.geometry)
        if self.spelling == "functional_with_indices":
            return function(h, return_indices=True, **self.geometry)[0]
        out = self.pool(h)
        return out[0] if self.spelling == "module_with_indices" else out

    def forward(self, x):
        return self.head(torch.tanh(self._pool(self.conv(x))).flatten(1))


SPELLINGS = ["module", "module_with_indices", "functional", "functional_with_indices"]


def _case(n, spelling, kernel, size, ratio=None, out=None, seed=0):
    torch.manual_seed(seed)
    model = Fractional(n, spelling, kernel, size, ratio, out).double()
    return model, torch.randn(3, 2, *(size,) * n, dtype=torch.float64)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(SPELLINGS), st.integers(1, 3), st.integers(5, 8), st.sampled_from([0.5, 0.7, None]),
       st.integers(0, 2 ** 16))
def test_2d_is_exact_and_equals_autograd_under_one_seed(spelling, kernel, size, ratio, seed):
    model, x = _case(2, spelling, kernel, size, ratio, None if ratio else size - kernel, seed)
    program = fbcompile.compile(model, x)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    error = torch.randn(3, 4, dtype=torch.float64)
    assert_equals_autograd_under_one_seed(model, program, x, error, seed)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("n", [2, 3])
def test_both_dimensions_and_front_ends_equal_autograd_under_one_seed(n, frontend):
    model, x = _case(n, "module", 2, 6, ratio=0.5)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert any(r.op.startswith(f"fractional_max_pool{n}d") for r in program.rules.values())
    assert_equals_autograd_under_one_seed(model, program, x, torch.randn(3, 4, dtype=torch.float64), 5)


def test_p_is_the_pseudo_inverse_and_i_is_refused():
    model, x = _case(2, "module", 3, 7, ratio=0.6)
    program = fbcompile.compile(model, x, condition="P")
    rows = fbcompile.verify(program, x, pinv_limit=10_000).rows
    row = next(row for row in rows if row["op"] == "fractional_max_pool2d")
    assert row["pjml_rel"] < 1e-9
    with pytest.raises(FBCompileError, match="fractional_max_pool2d is not invertible"):
        fbcompile.compile(model, x, condition="I")


@pytest.mark.parametrize("algorithm, options", LEARNERS,
                         ids=["-".join([algorithm, *map(str, options.values())]) for algorithm, options in LEARNERS])
def test_every_learner_steps(algorithm, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.FractionalMaxPool2d(2, output_ratio=0.5),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 1])
    assert_a_step_learns(model, fbcompile.learner(fbcompile.compile(model, x), algorithm, **options), x, y, loss_fn)
