"""Property tests of the pooling and reduction rules (float64): max pooling (padding, ceil_mode,
dilation, overlapping windows whose feedback must add), average pooling (padding, ceil_mode,
count_include_pad), adaptive average pooling (global, overlapping bins), adaptive max pooling (its
indices scattered to, with and without returning them) and mean/sum over dims."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.verify.checks import rule_errors
from fbcompile.verify.evaluate import forward_values

from helpers import compare_with_autograd

TOL = 1e-10


def assert_exact(model, x):
    program = fbcompile.compile(model, x)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    input_rel, _ = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL
    return program


@st.composite
def window(draw, n, max_padding=True, dilation=False):
    """Kernel, stride (often < kernel: overlapping windows), padding <= kernel // 2, ceil_mode."""
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    dil = tuple(draw(st.integers(1, 2)) for _ in range(n)) if dilation else (1,) * n
    sizes = tuple(d * (k - 1) + 1 + draw(st.integers(0, 4)) for k, d in zip(kernel, dil))
    one = (lambda t: t[0]) if n == 1 else (lambda t: t)
    return dict(kernel_size=one(kernel), stride=one(stride), padding=one(padding),
                ceil_mode=draw(st.booleans())), one(dil), sizes


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2]).flatmap(lambda n: st.tuples(st.just(n), window(n, dilation=True))))
def test_max_pool_unpool_adds_and_is_exact(case):
    n, (geometry, dilation, sizes) = case
    pool = (nn.MaxPool1d if n == 1 else nn.MaxPool2d)(dilation=dilation, **geometry)
    x = torch.randn(2, 3, *sizes, dtype=torch.float64)
    assert_exact(nn.Sequential(pool), x)


def test_overlapping_max_windows_add_their_feedback():
    """Input 1 is the maximum of both windows (kernel 2, stride 1): it receives a + b, not b."""
    model = nn.Sequential(nn.MaxPool1d(2, stride=1)).double()
    x = torch.tensor([[[0.0, 5.0, 1.0]]], dtype=torch.float64)
    program = fbcompile.compile(model, x)
    g = torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    assert torch.equal(program.propagate_error(x, g), torch.tensor([[[0.0, 5.0, 0.0]]], dtype=torch.float64))


def test_max_pool_2d_overlapping_counts_match_autograd():
    model = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1)).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert_exact(model, x)
    g = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    fb = fbcompile.compile(model, x).propagate_error(x, g)
    xx = x.clone().requires_grad_()
    (model(xx) * g).sum().backward()
    assert torch.allclose(fb, xx.grad, rtol=1e-13, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2]).flatmap(lambda n: st.tuples(st.just(n), window(n), st.booleans(),
                                                          st.sampled_from([None, 3]))))
def test_avg_pool_adjoint_is_exact(case):
    n, (geometry, _, sizes), count_include_pad, divisor = case
    options = dict(count_include_pad=count_include_pad, **geometry)
    if n == 2:
        options["divisor_override"] = divisor
    pool = (nn.AvgPool1d if n == 1 else nn.AvgPool2d)(**options)
    x = torch.randn(2, 2, *sizes, dtype=torch.float64)
    assert_exact(nn.Sequential(pool), x)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1), st.integers(0, 1), st.booleans())
def test_functional_avg_pool_spellings(pad, ceil, include):
    class Functional(nn.Module):
        def forward(self, x):
            a = torch.nn.functional.avg_pool2d(x, 3, 2, pad, bool(ceil), include)
            return torch.nn.functional.avg_pool1d(a.flatten(2), 2, 1, 0, False, include)

    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    assert_exact(Functional(), x)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2]), st.data())
def test_adaptive_avg_pool_adjoint_is_exact(n, data):
    """Output sizes from 1 (global) up to above the input size (overlapping and repeated bins)."""
    sizes = tuple(data.draw(st.integers(1, 7)) for _ in range(n))
    out = tuple(data.draw(st.integers(1, s + 2)) for s in sizes)
    pool = (nn.AdaptiveAvgPool1d if n == 1 else nn.AdaptiveAvgPool2d)(out[0] if n == 1 else out)
    x = torch.randn(2, 3, *sizes, dtype=torch.float64)
    assert_exact(nn.Sequential(pool), x)


@pytest.mark.parametrize("size,out", [(5, 3), (7, 4), (6, 1)])
def test_adaptive_overlapping_and_global_bins(size, out):
    assert_exact(nn.Sequential(nn.AdaptiveAvgPool2d((out, 1))), torch.randn(2, 2, size, 5, dtype=torch.float64))


@st.composite
def reductions(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    dims = draw(st.one_of(st.none(), st.lists(st.integers(-rank, rank - 1), min_size=0, max_size=rank,
                                              unique_by=lambda d: d % rank)))   # [] reduces every dim
    as_int = dims is not None and len(dims) == 1 and draw(st.booleans())
    return shape, (dims[0] if as_int else (tuple(dims) if dims is not None else None)), draw(st.booleans())


class Reduce(nn.Module):
    def __init__(self, how, dim, keepdim, spelling):
        super().__init__()
        self.how, self.dim, self.keepdim, self.spelling = how, dim, keepdim, spelling

    def forward(self, x):
        h = torch.tanh(x)
        if self.dim is None:
            return getattr(h, self.how)() if self.spelling == "method" else getattr(torch, self.how)(h)
        if self.spelling == "method":
            return getattr(h, self.how)(self.dim, keepdim=self.keepdim)
        return getattr(torch, self.how)(h, dim=self.dim, keepdim=self.keepdim)


@settings(max_examples=30, deadline=None)
@given(reductions(), st.sampled_from(["mean", "sum"]), st.sampled_from(["method", "function"]))
def test_mean_and_sum_over_dims(case, how, spelling):
    shape, dim, keepdim = case
    x = torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(Reduce(how, dim, keepdim, spelling), x, units="op")
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)


def test_global_average_pool_mean_feedback_is_broadcast_one_over_d():
    """Paper 002: global average pooling / mean -> broadcast 1/d."""
    class GAP(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    program = fbcompile.compile(GAP(), x)
    node = next(iter(program.rules))
    g = torch.randn(2, 3, dtype=torch.float64)
    fb = program.rules[node].error(EagerContext(node, forward_values(program, (x,)), program.model), g)["input"]
    assert torch.allclose(fb, g[:, :, None, None].expand(2, 3, 4, 5) / 20)


class AdaptiveMax(nn.Module):
    """Adaptive max pooling in one of its spellings; the indices, when returned, are read as values."""

    def __init__(self, n, out, spelling):
        super().__init__()
        self.n, self.out, self.spelling = n, out, spelling
        self.pool = getattr(nn, f"AdaptiveMaxPool{n}d")(out, return_indices=spelling == "module_with_indices")

    def forward(self, x):
        if self.spelling == "functional_with_indices":
            values, indices = getattr(F, f"adaptive_max_pool{self.n}d")(x, self.out, return_indices=True)
        elif self.spelling == "module_with_indices":
            values, indices = self.pool(x)
        else:
            return torch.tanh(self.pool(x))
        return torch.tanh(values) + 0.01 * indices.to(values.dtype)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.data(), st.sampled_from(["module", "module_with_indices",
                                                               "functional_with_indices"]))
def test_adaptive_max_pool_scatters_to_its_indices_exactly(n, data, spelling):
    """Output sizes up to above the input size (overlapping bins add their feedback)."""
    sizes = tuple(data.draw(st.integers(1, 6)) for _ in range(n))
    out = tuple(data.draw(st.integers(1, s + 2)) for s in sizes)
    x = torch.randn(2, 3, *sizes, dtype=torch.float64)
    assert_exact(AdaptiveMax(n, out, spelling), x)


@pytest.mark.parametrize("spelling", ["module", "functional_with_indices"])
def test_adaptive_max_pool_under_export_and_its_pseudo_inverse(spelling):
    model, x = AdaptiveMax(2, (3, 2), spelling), torch.randn(2, 3, 5, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="export")
    assert max(compare_with_autograd(model, x, program=program)) < TOL
    rows = fbcompile.verify(fbcompile.compile(model, x, condition="P"), x, pinv_limit=10_000).rows
    assert next(row for row in rows if row["op"].startswith("adaptive_max_pool"))["pjml_rel"] < 1e-9
