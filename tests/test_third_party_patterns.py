"""Patterns of third-party models (Hugging Face transformers, torchvision's segmentation and video
models) that were refused, crashed or computed a different function than the model, each written
here in a few lines (float64): repeat counts computed at run time (DeBERTa), ``baddbmm`` (Bloom),
``where`` with a scalar (T5), dict outputs, forward arguments with defaults, frozen parameters,
module hooks (forward, pre, backward; pruning) and parametrized weights."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune is not imported by torch.nn)
from torch import nn

import fbcompile
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


class GradientReversal(nn.Module):
    """A gradient hook registered in forward on an intermediate tensor (torch.export used to trace
    the call without recording it: the feedback had the gradient's sign wrong upstream)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h.register_hook(lambda g: -g)
        return self.b(h)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_gradient_hooks_registered_in_forward_are_refused(frontend):
    with pytest.raises(FBCompileError, match="registers a gradient hook on a tensor"):
        fbcompile.compile(GradientReversal().double(), torch.randn(3, 4, dtype=torch.float64), frontend=frontend)
    assert torch.Tensor.register_hook is not None and "hook_guard" not in torch.Tensor.register_hook.__module__


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


@pytest.mark.parametrize("wrap,inner", [(torch.compile, "_orig_mod"), (nn.DataParallel, "module")],
                         ids=["torch.compile", "DataParallel"])
def test_a_wrapped_model_is_refused_naming_the_module_to_pass(wrap, inner):
    model = _mlp()
    with pytest.raises(FBCompileError, match=f"pass the module it wraps, model.{inner}"):
        fbcompile.compile(wrap(model), torch.randn(3, 4, dtype=torch.float64))
    fbcompile.compile(getattr(wrap(model), inner), torch.randn(3, 4, dtype=torch.float64))
