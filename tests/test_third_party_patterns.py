"""Patterns of third-party models (Hugging Face transformers, torchvision's segmentation and video
models) that were refused, crashed or computed a different function than the model, each written
here in a few lines (float64): repeat counts computed at run time (DeBERTa), ``baddbmm`` (Bloom),
``where`` with a scalar (T5), dict outputs, forward arguments with defaults, frozen parameters,
module hooks (forward, pre, backward; pruning) and parametrized weights."""
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune is not imported by torch.nn)
from torch import nn

import fbcompile
from fbcompile.autograd_functions import FunctionCall, TensorSpec, derivative_gap
from fbcompile.errors import FBCompileError
from fbcompile.frontends import frontend_of
from fbcompile.verify.checks import relative_error

from helpers import compare_with_autograd, randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")


def matches_autograd(model, x, frontend="auto"):
    """(program, worst relative error of the input and every parameter gradient against autograd)."""
    program = fbcompile.compile(model, x, frontend=frontend)
    return program, max(compare_with_autograd(model, x, program=program))


class RuntimeRepeat(nn.Module):
    """DeBERTa's relative-position embeddings repeated by a count computed from the batch size."""

    def __init__(self):
        super().__init__()
        self.a, self.rel, self.head = nn.Linear(4, 6), nn.Parameter(torch.randn(1, 3, 2)), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x).view(-1, 3, 2)
        rel = self.rel.repeat(h.size(0), 1, 1)
        tiled = torch.tanh(h).repeat(1, 2, h.shape[-1] // 2)
        return self.head((h * rel).flatten(1) + tiled[:, :3, :2].flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_repeat_counts_computed_at_run_time_equal_autograd(frontend):
    model = randomise_vectors(RuntimeRepeat().double())
    assert_matches_autograd(model, torch.randn(3, 4, dtype=torch.float64), frontend, ops=["repeat"])


class Baddbmm(nn.Module):
    """Bloom's attention scores: baddbmm(alibi, q, k^T, beta, alpha) with q and k both activations."""

    def __init__(self, beta, alpha):
        super().__init__()
        self.q, self.k, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(9, 3)
        self.register_buffer("alibi", torch.randn(1, 3, 3))
        self.beta, self.alpha = beta, alpha

    def forward(self, x):
        q, k = self.q(x).view(-1, 3, 2), self.k(x).view(-1, 3, 2)
        scores = torch.baddbmm(self.alibi.expand(q.shape[0], 3, 3), q, k.transpose(1, 2), beta=self.beta,
                               alpha=self.alpha)
        return self.head(torch.softmax(scores, -1).flatten(1))


@pytest.mark.parametrize("beta,alpha", [(1.0, 1.0), (0.5, 0.25), (0.0, 2.0)])
def test_baddbmm_is_decomposed_and_equals_autograd(beta, alpha):
    model = randomise_vectors(Baddbmm(beta, alpha).double())
    x = torch.randn(3, 4, dtype=torch.float64)
    program = assert_matches_autograd(model, x, "export", ops=["bmm"])
    assert "baddbmm" not in program.traced.code
    assert dtp_angle(model, x) < 0.01


def test_baddbmm_with_beta_zero_ignores_a_nan_bias_as_baddbmm_does():
    model = Baddbmm(0.0, 1.0).double()
    model.alibi.fill_(float("nan"))
    x = torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="export")
    with torch.no_grad():
        assert torch.isfinite(program.executable("error").run_forward((x,))[0]).all()


class ScalarWhere(nn.Module):
    """T5's attention mask: torch.where(mask, scores, a scalar)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mask", torch.tensor([True, False, True, True, False, True]))

    def forward(self, x):
        h = self.a(x)
        return self.head(torch.where(self.mask, h, -0.5) + torch.where(~self.mask, 0.25, torch.tanh(h)))


def test_where_with_a_scalar_branch_through_torch_export():
    model = randomise_vectors(ScalarWhere().double())
    assert_matches_autograd(model, torch.randn(3, 4, dtype=torch.float64), "export", ops=["where"])


class DictOutput(nn.Module):
    """Hugging Face's ``{'logits': ...}`` and torchvision segmentation's ``{'out': ..., 'aux': ...}``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return {"out": self.b(h), "extra": {"aux": self.c(h), "none": None}}


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dict_outputs_are_flattened_in_pytree_order_by_both_front_ends(frontend):
    model = DictOutput().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    with torch.no_grad():
        output = program.executable("error").run_forward((x,))[0]
    assert [tuple(o.shape) for o in output] == [(3, 3), (3, 2)]       # None dropped
    errors = (torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    out = model(x)
    reference = torch.autograd.grad((out["out"] * errors[0]).sum() + (out["extra"]["aux"] * errors[1]).sum(),
                                    list(model.parameters()))
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, errors)
    assert all(relative_error(p.grad, g) < 1e-12 for p, g in zip(model.parameters(), reference))
    learner = fbcompile.learner(program, "dfa")
    learner.step(x, torch.tensor([0, 2, 1]), lambda outs, y: F.cross_entropy(outs[0], y) + outs[1].pow(2).mean())
    assert all(p.grad is not None for p in model.parameters())


class DefaultArgument(nn.Module):
    """``forward(self, pixel_values=None)``: the program's input must not keep the default, or a
    generated program that adds arguments after it does not compile (ddtp-linear's resume forward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, pixel_values=None):
        return self.b(torch.tanh(self.a(pixel_values)))


def test_inputs_with_defaults_work_in_every_generated_program():
    model = DefaultArgument()
    program = fbcompile.compile(model, torch.randn(3, 4), frontend="fx")
    for algorithm in ("bp", "dtp", "ddtp-linear", "dfa", "mf"):
        model.zero_grad(set_to_none=True)
        result = fbcompile.learner(program, algorithm, seed=0).step(torch.randn(3, 4), torch.tensor([0, 1, 2]),
                                                                    F.cross_entropy)
        assert result.loss == result.loss, algorithm
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), algorithm


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("algorithm", ["bp", "fa", "dtp", "dfa", "drtp", "mf", "ddtp-linear"])
def test_frozen_parameters_get_no_gradient(algorithm, frontend):
    """As autograd: a parameter with requires_grad=False gets no .grad (an optimizer over all the
    model's parameters would otherwise train it)."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    model[2].weight.requires_grad_(False)
    program = fbcompile.compile(model, torch.randn(3, 4), frontend=frontend)
    fbcompile.learner(program, algorithm, seed=0).step(torch.randn(3, 4), torch.tensor([0, 1, 2]), F.cross_entropy)
    assert model[2].weight.grad is None
    assert model[0].weight.grad is not None and model[4].weight.grad is not None
    model.zero_grad(set_to_none=True)
    program.propagate_error(torch.randn(3, 4), torch.randn(3, 3))
    assert model[2].weight.grad is None and model[2].bias.grad is not None


def _mlp():
    torch.manual_seed(3)
    return randomise_vectors(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())


HOOKED = {
    "forward_hook": lambda m: m[0].register_forward_hook(lambda mod, inp, out: 2.0 * out),
    "pre_hook": lambda m: m[2].register_forward_pre_hook(lambda mod, inp: (inp[0] * 3.0 - 0.5,)),
    "pruning": lambda m: torch.nn.utils.prune.random_unstructured(m[0], "weight", 0.5),
}


@pytest.mark.parametrize("hook", sorted(HOOKED))
def test_forward_hooks_are_traced_by_torch_export_and_refused_by_fx(hook):
    """fx would leave the hook out of the graph (a silently different model); "auto" captures with
    torch.export, which runs it, and the gradients equal autograd's."""
    model = _mlp()
    HOOKED[hook](model)
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(FBCompileError, match="torch.fx does not run module hooks"):
        fbcompile.compile(model, x, frontend="fx")
    program, worst = matches_autograd(model, x)
    assert frontend_of(program.traced)[0] == "export" and worst < 1e-12


def test_backward_hooks_are_refused_by_both_front_ends():
    model = _mlp()
    model[2].weight.register_hook(lambda g: 10 * g)
    for frontend in ("fx", "export", "auto"):
        with pytest.raises(FBCompileError, match="parameter 2.weight: gradient hook"):
            fbcompile.compile(model, torch.randn(3, 4, dtype=torch.float64), frontend=frontend)
    model = _mlp()
    model[0].register_full_backward_hook(lambda mod, gin, gout: None)
    with pytest.raises(FBCompileError, match="0: backward hook"):
        fbcompile.compile(model, torch.randn(3, 4, dtype=torch.float64))


def test_a_hook_added_after_compilation_refuses_the_next_step_and_changes_nothing():
    model = _mlp()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    program = fbcompile.compile(model, x)
    learner = fbcompile.learner(program, "bp")
    learner.step(x, y, F.cross_entropy)
    model.zero_grad(set_to_none=True)
    handle = model[0].register_forward_hook(lambda mod, inp, out: 2.0 * out)
    with pytest.raises(FBCompileError, match="hooks of Sequential changed since it was compiled"):
        learner.step(x, y, F.cross_entropy)
    with pytest.raises(FBCompileError, match="changed since it was compiled"):
        program.propagate_error(x, torch.randn(3, 3, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    learner.step(x, y, F.cross_entropy)


def test_a_hook_on_a_module_the_export_front_end_calls_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    model[1].register_forward_hook(lambda mod, inp, out: out + 1.0)
    with pytest.raises(FBCompileError, match="hook would run twice"):
        fbcompile.compile(model, torch.randn(3, 4, dtype=torch.float64), frontend="export")


class Parametrized(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(4, 5))
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_parametrized_weights_are_traced_and_train_their_parameters(frontend):
    model = randomise_vectors(Parametrized().double())
    x = torch.randn(3, 4, dtype=torch.float64)
    program, worst = matches_autograd(model, x, frontend)
    assert worst < 1e-12
    for algorithm in ("dfa", "dtp"):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, algorithm, seed=0).step(x, torch.tensor([0, 1, 2]), F.cross_entropy)
        original = dict(model.a.parametrizations.weight.named_parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in original.values()), algorithm


class DenseOutput(nn.Module):
    """A segmentation-style model: class scores at every pixel, so C = classes x height x width."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("algorithm", ["dfa", "drtp", "ddtp-linear"])
def test_direct_projections_over_the_memory_limit_are_refused_before_they_are_drawn(algorithm):
    program = fbcompile.compile(DenseOutput(), torch.randn(2, 3, 16, 16))
    # C = 4 * 16 * 16 = 1024 and S = 8 * 16 * 16 = 2048: B is 1024 x 2048 float32, 8 MiB
    with pytest.raises(fbcompile.errors.OptionError, match=r"would take 8\.0 MiB: .* C = 1024 .* 2048 values"):
        fbcompile.learner(program, algorithm, projection_memory_gb=0.004)
    learner = fbcompile.learner(program, algorithm, projection_memory_gb=0.01)
    assert sum(p.numel() for p in learner.projections.parameters()) == 1024 * 2048


class StraightThrough(nn.Module):
    """A straight-through estimator, x + (round(x) - x).detach(), and a stop-gradient branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = 3.0 * self.a(x)
        quantised = h + (torch.round(h) - h).detach()
        steps = torch.floor(h) + torch.sign(h) * torch.ceil(h) + torch.trunc(h)     # no gradient at all
        return self.b(torch.tanh(quantised) + torch.tanh(h).detach() * h + 0.1 * steps)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_detach_and_piecewise_constant_ops_equal_autograd(frontend):
    model = randomise_vectors(StraightThrough().double())
    x = torch.randn(4, 4, dtype=torch.float64)
    program, worst = matches_autograd(model, x, frontend)
    assert worst < 1e-12 and {"detach", "round"} <= {program.rules[n].op for n in program.rules}
    assert dtp_angle(model, x) < 0.01


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
