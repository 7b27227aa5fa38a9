"""What a capture does not see, each written here in a few lines (float64): grad-mode and autocast
blocks inside forward, custom autograd functions, noise drawn like a value, submodules replaced after
compiling, parameters read only for their shape, fixed (buffer) convolution filters and pads computed
at run time. Each was silently wrong or crashed before (the tests say how)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.autograd_functions import FunctionCall, TensorSpec, check_recorded_functions, derivative_gap
from fbcompile.errors import FBCompileError
from fbcompile.verify.checks import relative_error, rule_errors

from helpers import compare_with_autograd

pytestmark = pytest.mark.usefixtures("one_thread")


class NoGradInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            scale = h * 3.0
        return self.b(h + scale)


def test_a_no_grad_block_in_forward_is_refused_not_differentiated():
    """fx does not record grad-mode changes: the block's values would get feedback autograd never
    gives them (a 3x wrong gradient here). Refused by fx, and torch.export keeps the block apart."""
    x = torch.randn(3, 4)
    with pytest.raises(FBCompileError, match="forward changes the grad mode"):
        fbcompile.compile(NoGradInside(), x, frontend="fx")
    with pytest.raises(FBCompileError, match="neither torch.fx nor torch.export"):
        fbcompile.compile(NoGradInside(), x)
    with pytest.raises(FBCompileError, match=r"a torch.no_grad\(\) / set_grad_enabled block inside forward"):
        fbcompile.compile(NoGradInside(), x, frontend="export")
    with torch.no_grad():           # compiling under no_grad is not a change of mode
        fbcompile.compile(nn.Sequential(nn.Linear(4, 3)), x, frontend="fx")


class AutocastInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.a(x)
        return self.b(h.to(torch.float32))


def test_an_autocast_block_in_forward_is_refused_not_run_in_full_precision():
    """fx does not record autocast: the program computed the block in float32 where the model
    computes it in bfloat16 (gradients 0.25% off, a different function). Refused by fx, and
    torch.export keeps the block apart."""
    x = torch.randn(3, 4)
    with pytest.raises(FBCompileError, match="forward enters or leaves torch.autocast"):
        fbcompile.compile(AutocastInside(), x, frontend="fx")
    with pytest.raises(FBCompileError, match="neither torch.fx nor torch.export"):
        fbcompile.compile(AutocastInside(), x)
    with pytest.raises(FBCompileError, match="a torch.autocast block inside forward, kept by torch.export"):
        fbcompile.compile(AutocastInside(), x, frontend="export")
    with torch.autocast("cpu", dtype=torch.bfloat16):     # compiling under autocast is not a change
        fbcompile.compile(nn.Sequential(nn.Linear(4, 3)), x, frontend="fx")


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class CallsFunction(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.a, self.b, self.function = nn.Linear(4, 5), nn.Linear(5, 3), function

    def forward(self, x):
        return self.b(self.function.apply(torch.tanh(self.a(x))))


class HandWrittenTanh(torch.autograd.Function):
    """Backward = the derivative of the forward, written by hand (as Bloom's GeLU)."""
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors
        return g * (1 - y * y)


class HandWrittenScale(torch.autograd.Function):
    """The setup_context form (forward without ctx), with a non-tensor argument."""
    @staticmethod
    def forward(x, factor):
        return x * factor

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("function", [GradientReversal, StraightThroughRound])
@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_custom_autograd_functions_are_refused_naming_them(function, frontend):
    """Both front ends record a custom Function's forward ops, not its backward: under torch.export
    the reversal's gradient came out 300% off (wrong sign), the straight-through one 100% (zero).
    torch.fx cannot trace a Function; torch.export's calls are checked and these two refused."""
    model, x = CallsFunction(function), torch.randn(3, 4)
    with pytest.raises(FBCompileError, match=f"custom autograd function .*{function.__name__}"):
        fbcompile.compile(model, x, frontend=frontend)
    leaf = torch.randn(3, 5, requires_grad=True)      # outside a capture the function is untouched
    function.apply(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(leaf, -0.5 if function is GradientReversal else 1.0))


class Float32Only(torch.autograd.Function):
    """A kernel of one dtype (a custom CUDA or Triton op): its forward cannot run in float64."""
    @staticmethod
    def forward(ctx, x):
        if x.dtype != torch.float32:
            raise TypeError("float32 only")
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class NeedsItsExtension(torch.autograd.Function):
    """A kernel from an extension that is not there: it runs on no random input."""
    @staticmethod
    def forward(ctx, x):
        raise RuntimeError("the extension is not loaded")

    @staticmethod
    def backward(ctx, g):
        return g


def test_a_custom_function_of_one_dtype_is_compared_in_it():
    model, x = CallsFunction(Float32Only), torch.randn(3, 4)
    program = fbcompile.compile(model, x)
    assert program.traced.meta["fbcompile_frontend"][0] == "export"
    assert max(compare_with_autograd(model, x, program=program)) < 1e-6


def test_a_custom_function_that_cannot_be_compared_is_refused_saying_so():
    call = FunctionCall(NeedsItsExtension, (TensorSpec((3, 4), torch.float32),), ())
    with pytest.raises(FBCompileError, match="could not be run on random float64 inputs"):
        check_recorded_functions([call])


class CallsHandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(HandWrittenScale.apply(HandWrittenTanh.apply(self.a(x)), 1.5))


def test_custom_autograd_functions_whose_backward_is_the_derivative_compile_through_export():
    model, x = CallsHandWritten().double(), torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert program.traced.meta["fbcompile_frontend"][0] == "export"
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


@pytest.mark.parametrize("function, args, expected", [
    (HandWrittenTanh, (TensorSpec((4, 3), torch.float32),), 0.0),
    (HandWrittenScale, (TensorSpec((2, 5), torch.float32), 0.5), 0.0),
    (GradientReversal, (TensorSpec((4, 3), torch.float32),), 1.5),
    (StraightThroughRound, (TensorSpec((4, 3), torch.float32),), 1.0),
])
def test_the_derivative_gap_of_custom_functions(function, args, expected):
    """|backward - d forward| / |d forward| on random float64 inputs: 0 up to rounding for a
    hand-written derivative, 1.5 for a reversal scaled by 1/2 (|-0.5 g - g| / |g|), 1 for a
    straight-through round (autograd's derivative of round is 0, so the gap is relative to ours)."""
    gap = derivative_gap(FunctionCall(function, args, ()))
    assert abs(gap - expected) < 1e-12, gap


class Reparameterised(nn.Module):
    """A VAE's sampling step: z = mu + eps * exp(log_var / 2), eps = randn_like(mu)."""

    def __init__(self):
        super().__init__()
        self.enc, self.mu, self.log_var, self.dec = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        mu, log_var = self.mu(h), self.log_var(h)
        return self.dec(torch.tanh(mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_noise_drawn_like_a_value_is_a_constant_of_the_step(frontend):
    """randn_like reads only the shape of its argument: no feedback goes through it, and the
    multiplication reads the noise the forward drew (the same as autograd's under one seed)."""
    model, x = Reparameterised().double(), torch.randn(5, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    error = torch.randn(5, 3, dtype=torch.float64)
    torch.manual_seed(3)
    expected = torch.autograd.grad(model(x), list(model.parameters()), error)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    program.propagate_error(x, error)
    for param, grad in zip(model.parameters(), expected):
        assert relative_error(param.grad, grad) < 1e-12
    assert dtp_angle_with_seed(model, x) < 0.01


def dtp_angle_with_seed(model, x):
    """The angle between dtp's (beta = 1e-6) and bp's updates for one seeded noise draw."""
    program, targets = fbcompile.compile(model, x), torch.randn(x.shape[0], 3, dtype=x.dtype)
    updates = []
    for name, options in (("bp", {}), ("dtp", {"beta": 1e-6})):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        fbcompile.learner(program, name, **options).step(x, None, lambda out, _: F.mse_loss(out, targets))
        updates.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    cosine = float(updates[0] @ updates[1] / (updates[0].norm() * updates[1].norm()))
    return math.degrees(math.acos(min(1.0, cosine)))


def test_replacing_a_submodule_or_parameter_after_compiling_is_refused_before_anything_changes():
    """A new head put on after compiling got no gradient, and the program's output was the old
    head's (0.88 off the model's): the program held the objects it captured."""
    model, x, y = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(5, 6), torch.randint(0, 3, (5,))
    program = fbcompile.compile(model, x)
    learner = fbcompile.learner(program, "dtp")
    learner.step(x, y, F.cross_entropy)                       # in-place updates keep the objects
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    learner.step(x, y, F.cross_entropy)
    model[2] = nn.Linear(8, 3)
    model.zero_grad(set_to_none=True)
    with pytest.raises(FBCompileError, match="replaced, added or removed since it was compiled"):
        learner.step(x, y, F.cross_entropy)
    assert all(p.grad is None for p in model.parameters())
    program = fbcompile.compile(model, x)
    model[0].weight = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(FBCompileError, match="replaced, added or removed"):
        program.propagate_error(x, torch.randn(5, 3))
    with_statistics = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    program = fbcompile.compile(with_statistics, x, frontend="export")
    with_statistics.double()                                # replaces the BatchNorm buffers
    with pytest.raises(FBCompileError, match=r"\.double\(\)"):
        program.propagate_error(x.double(), torch.randn(5, 3, dtype=torch.float64))


class ScaledStandardisedConv(nn.Conv2d):
    """timm's ScaledStdConv2d pattern: the weight standardised by F.batch_norm over its rows and
    viewed back with reshape_as(self.weight), then scaled by a gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        rows = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(rows, None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, self.gain * weight, self.bias)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_parameter_read_only_for_its_shape_learns_only_where_its_values_are_read(frontend):
    """reshape_as(self.weight) reads the weight's shape: the feedback graph used to ask autograd for
    a gradient through it and crashed at run time; the weight learns through the batch_norm path."""
    model = nn.Sequential(ScaledStandardisedConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


class ShapeFromParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.template = nn.Linear(6, 6), nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return torch.tanh(self.a(x)[0].reshape_as(self.template))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_parameter_read_only_for_its_shape_gets_no_gradient_as_in_autograd(frontend):
    model, x = ShapeFromParameter().double(), torch.randn(3, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, torch.randn(2, 3, dtype=torch.float64))
    assert model.template.grad is None and model.a.weight.grad is not None
    model.zero_grad(set_to_none=True)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


class BlurPool(nn.Module):
    """timm's anti-aliased downsampling: a fixed binomial filter (a buffer) per channel, stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        row = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (row[:, None] * row[None, :] / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


def _blurred():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), BlurPool(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_convolution_with_a_fixed_buffer_filter_feeds_back_through_it(frontend):
    """The conv rule asked for a feedback-weight slot of the filter, which is no parameter: compile
    failed with a KeyError. A fixed filter is an operator every learner feeds back through, as a
    pooling; feedback-weight learners draw no random matrix for it."""
    model, x = _blurred().double(), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert_rules_exact(program, x)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12
    y = torch.randint(0, 3, (5,))
    for algorithm in ("fa", "dtp", "dfa"):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, algorithm, seed=0).step(x, y, F.cross_entropy)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(slot.qualname.endswith("weight") for slot in program.slots)


class RelativePad(nn.Module):
    """Pads computed from the input's size at run time (timm's relative-position attention)."""

    def __init__(self, mode):
        super().__init__()
        self.a, self.mode = nn.Linear(4, 6), mode

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return F.pad(h, [h.shape[-1] // 3, h.shape[-1] // 2], mode=self.mode)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pads_computed_at_run_time_equal_autograd(mode, frontend):
    """The pad rule read the amounts as constants: a RuleError at compile time."""
    model, x = RelativePad(mode).double(), torch.randn(3, 5, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert "pad" in {program.rules[n].op for n in program.rules}
    assert_rules_exact(program, x)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


def assert_rules_exact(program, x):
    """Every rule's TJML residual and adjoint gap with random float64 vectors."""
    for name, (tjml, gap) in rule_errors(program, x).items():
        assert tjml < 1e-10 and gap < 1e-10, (name, tjml, gap)
