"""Property tests of the convolution rules (float64): the transposed convolution is J_F^T exactly
for every stride, padding, dilation, groups and kernel shape, sizes are restored, and weight
gradients equal autograd's."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.verify.checks import rule_errors
from fbcompile.verify.evaluate import forward_values

from helpers import compare_with_autograd

TOL = 1e-10


@st.composite
def conv_cases(draw):
    """(Conv module, input) with random geometry; 'same' only with stride 1 (torch's rule)."""
    n = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * n if padding_kind == "same" else tuple(draw(st.integers(1, 3)) for _ in range(n))
    padding = {"int": draw(st.integers(0, 2)), "tuple": tuple(draw(st.integers(0, 2)) for _ in range(n)),
               "same": "same", "valid": "valid"}[padding_kind]
    pads = (padding,) * n if isinstance(padding, int) else padding if isinstance(padding, tuple) else (0,) * n
    sizes = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
                  for d, k, p in zip(dilation, kernel, pads))
    cls = nn.Conv1d if n == 1 else nn.Conv2d
    conv = cls(c_in, c_out, kernel if n == 2 else kernel[0], stride=stride, padding=padding, dilation=dilation,
               groups=groups, bias=draw(st.booleans())).double()
    x = torch.randn(2, c_in, *sizes, dtype=torch.float64)
    return conv, x


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_conv_transpose_rule_is_exact(case):
    conv, x = case
    model = nn.Sequential(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns about 'same' with even kernels
        program = fbcompile.compile(model, x)
        (tjml_rel, gap), = rule_errors(program, x).values()
        input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert tjml_rel < TOL and gap < TOL
    assert input_rel < TOL and param_rel < TOL


def _rule_output(model, x, g, node_name="_0"):
    program = fbcompile.compile(model, x)
    node = next(n for n in program.rules if n.name == node_name)
    ctx = EagerContext(node, forward_values(program, (x,)), model)
    return program.rules[node].error(ctx, g)["input"]


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 2),
       st.integers(0, 1))
def test_stride_one_feedback_is_convolution_with_rotated_swapped_kernel(c_in, c_out, kh, kw, dilation, pad):
    """Paper 002 eq. 20: G(g) = ROT(W) * g, the kernel rotated by 180 degrees with in/out swapped,
    i.e. a full convolution (padding d(k-1) - p) of g with W.flip(-1, -2).transpose(0, 1)."""
    conv = nn.Conv2d(c_in, c_out, (kh, kw), padding=(pad * (kh // 2), pad * (kw // 2)), dilation=dilation).double()
    x = torch.randn(2, c_in, 9, 8, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    rotated = conv.weight.flip(-1, -2).transpose(0, 1)
    full = [dilation * (k - 1) - p for k, p in zip((kh, kw), conv.padding)]
    expected = F.conv2d(g, rotated, padding=full, dilation=dilation)
    assert torch.allclose(_rule_output(nn.Sequential(conv), x, g), expected, rtol=1e-12, atol=1e-12)


def test_rotated_kernel_per_group():
    """With groups, the rotation and the in/out swap happen inside each group."""
    conv = nn.Conv1d(4, 6, 3, groups=2).double()
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    w = conv.weight.reshape(2, 3, 2, 3).flip(-1).transpose(1, 2).reshape(4, 3, 3)
    expected = F.conv1d(g, w, padding=2, groups=2)
    assert torch.allclose(_rule_output(nn.Sequential(conv), x, g), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [8, 9, 10])
def test_output_size_restored_when_stride_skips_rows(size):
    """Strided windows leave rows unread: the feedback has the input's size, zeros in those rows."""
    conv = nn.Conv2d(1, 2, 3, stride=3).double()
    x = torch.randn(1, 1, size, size, dtype=torch.float64)
    fb = _rule_output(nn.Sequential(conv), x, torch.randn_like(conv(x)))
    assert fb.shape == x.shape
    unread = (size - 3) % 3
    if unread:
        assert torch.count_nonzero(fb[..., -unread:]) == 0


def test_functional_conv_with_parameters_through_get_attr():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3, 2))

        def forward(self, x):
            return F.conv2d(x, self.w, None, (2, 1), (1, 0), 1, 2)

    model = Functional().double()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    (tjml_rel, gap), = rule_errors(program, x).values()
    assert tjml_rel < TOL and gap < TOL
    assert max(compare_with_autograd(model, x, program=program)) < TOL


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_convolutions_padding_in_other_modes_are_traced_through_and_exact(mode, dims):
    """torch.fx traces such a module into F.pad in its mode and the unpadded convolution."""
    conv = getattr(nn, f"Conv{dims}d")(2, 3, 3, padding=(1, 2, 1)[:dims] if dims > 1 else 2, padding_mode=mode)
    model = nn.Sequential(conv, nn.Tanh()).double()
    x = torch.randn(2, 2, *(5, 4, 3)[:dims], dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="fx")
    assert {program.rules[n].op for n in program.rules} >= {"pad", f"conv{dims}d"}
    for tjml_rel, gap in rule_errors(program, x).values():
        assert tjml_rel < TOL and gap < TOL
    assert max(compare_with_autograd(model, x, program=program)) < TOL


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), st.integers(0, 2), st.integers(1, 3),
       st.booleans(), st.sampled_from(["int", "same"]), st.booleans())
def test_one_output_position_gemm_path_equals_autograd(kh, kw, dilation, pad, stride, bias, padding_kind, lead):
    """At one output position per sample the CPU takes the GEMMs of rules/conv_position.py: in the
    fused error-mode call (the second conv, and the first one behind a leading 1x1 conv) and the
    weight-only call (the first conv when it reads the model input), input and weight gradients
    equal autograd's, with one valid kernel tap or several."""
    if padding_kind == "same":
        padding, size, stride = "same", (1, 1), 1
    else:
        padding = tuple(min(pad, dilation * (k - 1) // 2) for k in (kh, kw))    # one window fits
        size = tuple(dilation * (k - 1) + 1 - 2 * p for k, p in zip((kh, kw), padding))
    first = nn.Conv2d(3, 5, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias)
    second = nn.Conv2d(5, 4, 3, padding=1, bias=not bias)
    leading = [nn.Conv2d(3, 3, 1), nn.Tanh()] if lead else []
    model = nn.Sequential(*leading, first, nn.Tanh(), second, nn.Flatten()).double()
    x = torch.randn(3, 3, *size, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns about 'same' with even kernels
        assert model[:len(leading) + 2](x).shape[2:] == (1, 1)
        input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), st.integers(0, 3), st.integers(1, 3),
       st.integers(0, 2))
def test_one_output_position_backward_is_the_adjoint(kh, kw, dilation, pad, stride, extra):
    """<conv(x), g> = <x, dx(g)> and <conv_W(x), g> = <W, dW(g)> (the conv is bilinear) for the GEMM
    path, including windows that reach into the padding and rows no window reads."""
    from fbcompile.rules.conv import conv_backward
    size = tuple(max(1, dilation * (k - 1) + 1 - 2 * pad) + min(extra, stride - 1) for k in (kh, kw))
    x, w = torch.randn(3, 4, *size, dtype=torch.float64), torch.randn(5, 4, kh, kw, dtype=torch.float64)
    y = F.conv2d(x, w, None, stride, pad, dilation)
    assume(y.shape[2:] == (1, 1))                   # wide padding can leave several windows
    g = torch.randn_like(y)
    dx, dw, _ = conv_backward(g, x, w, (stride, stride), (dilation, dilation), [(pad, pad)] * 2, 1, False)
    inner = float((y * g).sum())
    assert abs(inner - float((x * dx).sum())) <= 1e-12 * max(1.0, abs(inner))
    assert abs(inner - float((w * dw).sum())) <= 1e-12 * max(1.0, abs(inner))
