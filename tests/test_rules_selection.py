"""Selections that return (values, indices) (rules/selection.py), in float64 through both front ends:
every rule's TJML residual and adjoint gap with random vectors, input and parameter gradients equal
to autograd's (ties follow the returned index, as autograd's do), J^+ and J^-1 against the dense
Jacobian for the conditions claimed, refusals by name, and DTP's small-beta limit."""
import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import UnsupportedOpError

from helpers import randomise_vectors
from test_conditions import Fn, assert_condition
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "sort": lambda h: torch.sort(h, dim=1)[0] * h,
    "sort_descending_stable": lambda h: h.sort(dim=-1, descending=True, stable=True).values + h.flip(-1),
    "topk": lambda h: torch.cat([h.topk(3, dim=1).values, h[:, :5]], 1),
    "topk_smallest_unsorted": lambda h: torch.cat([torch.topk(h, 2, 1, largest=False, sorted=False)[0], h[:, 2:]], 1),
    "kthvalue": lambda h: h * h.kthvalue(2, dim=1, keepdim=True).values,
    "median": lambda h: h - h.median(dim=1, keepdim=True)[0],
    "nanmedian": lambda h: h * torch.nanmedian(h, 1).values.unsqueeze(1),
    "mode": lambda h: h * torch.mode(torch.tanh(h), 1)[0].unsqueeze(1),
    "cummax": lambda h: torch.cummax(h, dim=1)[0],
    "cummin": lambda h: h.cummin(1).values * h,
    "indices_feed_a_gather": lambda h: torch.cat([h.gather(1, h.topk(4, 1).indices) * 2.0, h[:, 4:]], 1),
}
OPS = {"sort_descending_stable": "sort", "topk_smallest_unsorted": "topk", "indices_feed_a_gather": "topk"}


class Case(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.fn = fn

    def forward(self, x):
        h = self.fn(self.a(x))
        return self.b(h[:, :8])


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_selections_equal_autograd(name, frontend):
    model = randomise_vectors(Case(CASES[name]).double())
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend, ops=[OPS.get(name, name)])


# equal entries: ties must follow the index the forward returned (cummax repeats its running maximum)
TIES = torch.tensor([[0.5, -1.0, 0.5, 0.25, 0.5], [2.0, 2.0, 2.0, -3.0, 2.0], [0.0, -1.0, -2.0, -3.0, 4.0]],
                    dtype=torch.float64)


@pytest.mark.parametrize("fn", [lambda h: h.sort(1).values, lambda h: h.topk(2, 1).values,
                                lambda h: h.median(1).values, lambda h: torch.mode(h, 1).values,
                                lambda h: h.cummax(1).values, lambda h: h.kthvalue(3, 1, True).values],
                         ids=["sort", "topk", "median", "mode", "cummax", "kthvalue"])
def test_ties_follow_the_returned_indices(fn):
    x = TIES.clone()
    program = fbcompile.compile(Fn(fn), x)
    g = torch.randn_like(fn(x))
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(fn(leaf), leaf, g)[0]
    assert torch.equal(program.propagate_error(x, g), expected)


@pytest.mark.parametrize("name", ["sort", "topk", "kthvalue", "median", "mode"])
def test_pinv_is_the_transpose(name):
    fns = {"sort": lambda h: h.sort(1).values, "topk": lambda h: h.topk(2, 1).values,
           "kthvalue": lambda h: h.kthvalue(2, 1).values, "median": lambda h: h.median(1, True).values,
           "mode": lambda h: torch.mode(h, 1).values}
    assert_condition(Fn(fns[name]), torch.randn(3, 5, dtype=torch.float64), "P")


def test_sort_is_inverted_exactly():
    assert_condition(Fn(lambda h: torch.sort(h, 1, descending=True).values), torch.randn(3, 5, dtype=torch.float64), "I")


@pytest.mark.parametrize("fn,op", [(lambda h: h.topk(2, 1).values, "topk"), (lambda h: h.median(1).values, "median")],
                         ids=["topk", "median"])
def test_condition_i_is_refused_where_entries_are_dropped(fn, op):
    with pytest.raises(UnsupportedOpError, match=f"{op} drops entries, so it has no inverse"):
        fbcompile.compile(Fn(fn), torch.randn(3, 5, dtype=torch.float64), condition="I")


@pytest.mark.parametrize("condition", ["P", "I"])
def test_cumulative_extremes_claim_only_the_transpose(condition):
    with pytest.raises(UnsupportedOpError, match="cummax"):
        fbcompile.compile(Fn(lambda h: h.cummax(1).values), torch.randn(3, 5, dtype=torch.float64), condition=condition)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("op", ["median", "nanmedian"])
def test_median_of_all_entries_equals_autograd_and_splits_ties_as_autograd(op, frontend):
    """No index is returned: T is autograd's vjp, which spreads the feedback over tied entries."""
    reduce = torch.median if op == "median" else torch.nanmedian
    model = randomise_vectors(Case(lambda h: h * reduce(h)).double())
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend, ops=[op])
    fn = lambda h: h.sin() * reduce(h)   # noqa: E731  (TIES holds its median, 0.5, three times)
    x = TIES.clone()
    g = torch.randn_like(fn(x))
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(fn(leaf), leaf, g)[0]
    assert torch.equal(fbcompile.compile(Fn(fn), x, frontend=frontend).propagate_error(x, g), expected)
    with pytest.raises(UnsupportedOpError, match=f"torch.{op}\\(input\\) over all entries"):
        fbcompile.compile(Fn(lambda h: h * reduce(h)), torch.randn(3, 5, dtype=torch.float64), condition="P")


@pytest.mark.parametrize("name", ["sort", "topk", "median", "cummax"])
def test_selections_meet_the_small_beta_limit(name):
    model = randomise_vectors(Case(CASES[name]))
    assert dtp_angle(model, torch.randn(5, 4, dtype=torch.float64)) < 0.01


def test_a_sort_across_the_batch_is_exact_in_error_mode():
    """Sorting along dim 0 mixes the samples: not batch-local, still J^T."""
    model = randomise_vectors(Case(lambda h: torch.sort(h, dim=0).values * h).double())
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), "fx", ops=["sort"])
