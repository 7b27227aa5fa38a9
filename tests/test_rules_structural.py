"""Structural, arithmetic and dropout rules (float64): reshapes, transposes, permutes, cat, split,
chunk, basic indexing, add/sub with broadcasting and alpha, mul/div by constants, neg, dropout."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.verify.checks import rule_errors

from helpers import compare_with_autograd

TOL = 1e-10


class Lambda(nn.Module):
    """A model from a function of x (and of the module's own constants)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(torch.tanh(x))


def assert_exact(model, x, **compile_options):
    program = fbcompile.compile(model, x, **compile_options)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL and param_rel < TOL
    return program


SHAPE = (3, 4, 2, 3)
STRUCTURAL = {
    "flatten": lambda h: h.flatten(1),
    "flatten_mid": lambda h: torch.flatten(h, 1, 2),
    "nn_flatten": nn.Flatten(2),
    "view": lambda h: h.view(h.size(0), -1),
    "view_tuple": lambda h: h.view((3, 8, 3)),
    "reshape": lambda h: h.reshape(3, 2, 12),
    "torch_reshape": lambda h: torch.reshape(h, (3, -1, 2)),
    "unflatten": lambda h: h.unflatten(1, (2, 2)),
    "transpose": lambda h: h.transpose(1, 3),
    "transpose_neg": lambda h: torch.transpose(h, -1, -2),
    "permute": lambda h: h.permute(0, 3, 1, 2),
    "permute_tuple": lambda h: torch.permute(h, (0, 2, 3, 1)),
    "contiguous": lambda h: h.transpose(1, 2).contiguous(),
    "clone": lambda h: h.clone(),
    "squeeze": lambda h: h[:, :1].squeeze(1),
    "squeeze_all": lambda h: h[:, :, :1].squeeze(),
    "unsqueeze": lambda h: h.unsqueeze(2),
    "unsqueeze_neg": lambda h: torch.unsqueeze(h, -1),
    "cat": lambda h: torch.cat([h, 2 * h[:, :2]], dim=1),
    "cat_last": lambda h: torch.cat((h[..., :1], h.sigmoid(), h), -1),
    "split": lambda h: h.split(1, dim=1)[0] - h.split(1, dim=1)[3] + torch.split(h, 1, 1)[2],
    "split_sections": lambda h: h.split([1, 3], 1)[1] * 2,
    "split_unused": lambda h: torch.split(h, 2, dim=3)[0],
    "chunk": lambda h: torch.cat([h.chunk(2, dim=1)[1], h.chunk(2, dim=1)[0]], 1),
    "chunk_unused": lambda h: h.chunk(3, dim=-1)[2],
    "index": lambda h: h[:, 1],
    "index_slices": lambda h: h[:, 1:3, ::2, -1],
    "index_none": lambda h: h[:, None, 2:],
    "index_ellipsis": lambda h: h[..., 0],
    "index_batch": lambda h: h[1:],
    "identity": nn.Identity(),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_ops_are_exact(name):
    fn = STRUCTURAL[name]
    model = Lambda(fn) if not isinstance(fn, nn.Module) else nn.Sequential(nn.Tanh(), fn)
    assert_exact(model.double(), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(4)), st.integers(0, 3), st.integers(0, 3), st.integers(1, 3))
def test_random_permutes_transposes_and_splits(perm, d0, d1, size):
    """Pieces of a split along d0, concatenated back in reverse order."""
    moved = [SHAPE[p] for p in perm]
    moved[d0], moved[d1] = moved[d1], moved[d0]
    count = -(-moved[d0] // size)

    def fn(h):
        parts = h.permute(*perm).transpose(d0, d1).split(size, dim=d0)
        return torch.cat([parts[i] for i in reversed(range(count))], dim=d0)
    assert_exact(Lambda(fn), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@st.composite
def broadcast_shapes(draw):
    """A full shape and a shape that broadcasts to it (dims dropped from the front or set to 1)."""
    full = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    keep = draw(st.integers(0, len(full)))
    small = tuple(1 if draw(st.booleans()) else s for s in full[len(full) - keep:])
    return full, small


class TwoActive(nn.Module):
    """add/sub of two activations of different (broadcasting) shapes, with alpha: ``b`` is x summed
    down to ``small`` (size-1 dims kept, leading dims dropped, the batch dim included)."""

    def __init__(self, full, small, how, alpha, swap):
        super().__init__()
        ones = tuple(1 + len(full) - len(small) + i for i, s in enumerate(small) if s == 1)
        self.ones, self.lead = ones, tuple(range(1 + len(full) - len(small)))
        self.how, self.alpha, self.swap = how, alpha, swap

    def forward(self, x):
        a = torch.tanh(x)
        b = torch.sigmoid(x)
        if self.ones:
            b = b.sum(self.ones, keepdim=True)
        b = b.sum(self.lead)
        first, second = (b, a) if self.swap else (a, b)
        if self.alpha == 1:
            return first + second if self.how == "add" else first - second
        return (torch.add if self.how == "add" else torch.sub)(first, second, alpha=self.alpha)


@settings(max_examples=30, deadline=None)
@given(broadcast_shapes(), st.sampled_from(["add", "sub"]), st.sampled_from([1, 2.5, -0.5]), st.booleans())
def test_add_sub_broadcast_and_alpha(shapes, how, alpha, swap):
    full, small = shapes
    x = torch.randn(2, *full, dtype=torch.float64)
    assert_exact(TwoActive(full, small, how, alpha, swap), x, units="op")


class Constants(nn.Module):
    """mul/div by numbers, by a buffer, by a non-active tensor and by a parameter; neg; in-place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(4) + 0.5)
        self.gain = nn.Parameter(torch.rand(3, 4) + 0.5)

    def forward(self, x):
        h = torch.tanh(x)
        a = h * 3.0 + 2.0 * h - h / 4.0
        b = torch.mul(h, self.scale) / self.scale.sum()
        c = torch.div(h, self.gain) * self.scale.sum()
        d = -h.mul(torch.ones(4, dtype=x.dtype) * 2)
        e = torch.neg(h).div(2.0)
        f = h * 1.0
        f *= 3.0
        f /= 2.0
        return a + b + c + d + e + f


def test_mul_div_by_constants_and_neg():
    model = Constants().double()
    assert_exact(model, torch.randn(5, 3, 4, dtype=torch.float64), units="op")


def test_parameter_through_a_computed_value_warns():
    """``x * self.g.sum()``: the factor is computed outside the feedback graph, so error mode cannot
    give ``g`` its gradient there; compiling says so instead of silently dropping it."""
    class Derived(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.rand(3))

        def forward(self, x):
            return torch.tanh(x) * self.g.sum()

    with pytest.warns(UserWarning, match=r"(?s)mul.*'other'.*parameter\(s\) g") as caught:
        program = fbcompile.compile(Derived().double(), torch.randn(2, 3, dtype=torch.float64))
    assert any("outside the feedback graph" in str(w.message) for w in caught)
    assert "g" not in program.feedback["error"].params          # error mode indeed gives g nothing


def test_add_of_a_parameter_gets_its_gradient():
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3, 4))

        def forward(self, x):
            return torch.tanh(x + self.pos) - torch.sub(x, self.pos, alpha=2)

    assert_exact(Offset().double(), torch.randn(2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("cls,shape", [(nn.Dropout, (4, 6)), (nn.Dropout1d, (4, 3, 5)), (nn.Dropout2d, (4, 3, 2, 2))])
@pytest.mark.parametrize("train", [True, False])
def test_dropout_reuses_its_mask(cls, shape, train):
    model = nn.Sequential(nn.Tanh(), cls(0.5)).double().train(train)
    x = torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, name


def test_fanout_sums_feedback():
    """A value used four times receives the sum of its four feedbacks."""
    model = Lambda(lambda h: torch.cat([h, h.transpose(0, 1)], 1) + torch.cat([h, 2 * h], 1))
    x = torch.randn(3, 3, dtype=torch.float64)
    assert_exact(model, x, units="op")
