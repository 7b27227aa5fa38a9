"""Model buffers inside forward (fbcompile.buffer_writes, trace.preserved_state).

Each case here was silently wrong before: torch.fx ran Python-level work on buffers once, while
tracing, so a value computed from a buffer became a constant of the program (stale after the user
changed the buffer), a counter was incremented by compile() and never by a step, and an EMA written
in forward was never updated; compile() and verify() wrote the running statistics of a functional
BatchNorm (timm's BatchNormAct2d) into the user's buffers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.buffer_writes import count_up
from fbcompile.errors import FBCompileError, NonFiniteError, UntraceableModelError
from fbcompile.trace import preserved_state
from helpers import compare_with_autograd, randomise_vectors

FRONTENDS = ["fx", "export"]
LEARNERS = ["bp", "fa", "dfa", "sdfa", "drtp", "shallow", "dtp", "tp", "ddtp-linear", "ddtp-rhl", "mf", "mf-dd"]


class ScaledByBuffer(nn.Module):
    """y = W x * exp(s) with s a buffer: the scale is state, read at every call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.register_buffer("log_scale", torch.randn(4))

    def forward(self, x):
        return self.lin(x) * self.log_scale.exp()


class FunctionalBatchNorm(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: its own forward, F.batch_norm on its buffers and a counter
    incremented in Python (a momentum of None makes the counter set the averaging factor)."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, factor, self.eps))


def bn_net(momentum=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FunctionalBatchNorm(4, momentum=momentum), nn.Conv2d(4, 4, 3),
                          FunctionalBatchNorm(4, momentum=momentum), nn.Flatten(), nn.Linear(64, 5))
    return randomise_vectors(model).train()


def buffers_of(model):
    return {name: (b.clone(), b._version) for name, b in model.named_buffers()}


def assert_same_buffers(model, before):
    for name, b in model.named_buffers():
        value, version = before[name]
        assert torch.equal(b, value), name
        assert b._version == version, name


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_value_computed_from_a_buffer_follows_the_buffer(frontend):
    torch.manual_seed(1)
    model = ScaledByBuffer().double()
    program = fbcompile.compile(model, torch.randn(2, 5, dtype=torch.float64), frontend=frontend)
    with torch.no_grad():
        model.log_scale.copy_(torch.randn(4))           # e.g. a checkpoint loaded after compiling
    x = torch.randn(3, 5, dtype=torch.float64)
    learner = fbcompile.learner(program, "bp")
    result = learner.step(x, torch.randn(3, 4, dtype=torch.float64), F.mse_loss)
    assert torch.allclose(result.output, model(x), rtol=1e-14, atol=1e-14)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_compile_and_verify_leave_the_buffers_alone(frontend):
    model = bn_net()
    before = buffers_of(model)
    program = fbcompile.compile(model, torch.randn(2, 3, 8, 8), frontend=frontend)
    fbcompile.verify(program, torch.randn(2, 3, 8, 8), probes=2)
    fbcompile.learner(program, "drtp")
    assert_same_buffers(model, before)


@pytest.mark.parametrize("algorithm", LEARNERS)
def test_every_learner_counts_and_averages_as_the_model_does(algorithm):
    model = bn_net()
    eager = copy.deepcopy(model)
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 3, 8, 8)), algorithm)
    torch.manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
        learner.step(x, y, F.cross_entropy)
        eager(x)
    for (name, ours), (_, theirs) in zip(model.named_buffers(), eager.named_buffers()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name
    assert int(model[1].num_batches_tracked) == 3


def test_a_failed_step_does_not_count():
    model = bn_net()
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 3, 8, 8)), "drtp")
    before = {name: b.clone() for name, b in model.named_buffers()}
    bad = torch.randn(6, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        learner.step(bad, torch.randint(0, 5, (6,)), F.cross_entropy)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_counter_outside_batch_norm_is_kept(frontend):
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls.add_(2)
            return self.lin(x)

    torch.manual_seed(3)
    model = Counting()
    program = fbcompile.compile(model, torch.randn(2, 5), frontend=frontend)
    assert int(model.calls) == 0
    assert any(n.target is count_up for n in program.traced.graph.nodes)
    for algorithm in ("bp", "drtp"):
        fbcompile.learner(program, algorithm).step(torch.randn(4, 5), torch.randint(0, 3, (4,)), F.cross_entropy)
    assert int(model.calls) == 4


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("write", ["ema", "copy", "item", "assign"])
def test_other_writes_to_a_buffer_are_refused_by_name(frontend, write):
    """Refused by name, with the model left intact ("assign": fx used to leave its Proxy in the module)."""
    class Writing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.register_buffer("mean", torch.zeros(3))

        def forward(self, x):
            y = self.lin(x)
            if write == "ema":
                self.mean.mul_(0.9).add_(0.1 * y.detach().mean(0))
            elif write == "copy":
                self.mean.copy_(y.detach().mean(0))
            elif write == "item":
                self.mean[0] = 1.0
            else:
                self.mean = 0.9 * self.mean + 0.1 * y.detach().mean(0)
            return y

    model = Writing()
    mean = model.mean
    named = "assigns a traced value to 'mean'" if (frontend, write) == ("fx", "assign") else "mean"
    with pytest.raises(FBCompileError, match=named):
        fbcompile.compile(model, torch.randn(2, 5), frontend=frontend)
    assert model.mean is mean and torch.equal(mean, torch.zeros(3))


def test_a_counter_that_sets_the_averaging_factor_is_refused():
    with pytest.raises(UntraceableModelError, match="num_batches_tracked"):
        fbcompile.compile(bn_net(momentum=None), torch.randn(2, 3, 8, 8))


def test_preserved_state_gives_every_holder_a_private_copy():
    model = bn_net()
    program = fbcompile.compile(model, torch.randn(2, 3, 8, 8))
    held = program.traced.get_buffer("1.running_mean")       # the graph module's own container
    assert held is model[1].running_mean
    before = buffers_of(model)
    with preserved_state(model):
        held.add_(1.0)
        assert torch.equal(model[1].running_mean, before["1.running_mean"][0] + 1.0)
    assert held is model[1].running_mean
    assert_same_buffers(model, before)


def test_a_pending_backward_survives_preserved_state():
    """Autograd saved a buffer (the scale a product's backward reads); a write inside the block goes
    to a copy and the version counter is put back, so the backward runs, on the original value."""
    torch.manual_seed(4)
    model = ScaledByBuffer()
    x = torch.randn(3, 5)
    (model.lin(x) * model.log_scale).sum().backward()
    expected = model.lin.weight.grad.clone()
    model.zero_grad()
    loss = (model.lin(x) * model.log_scale).sum()
    with preserved_state(model):
        model.log_scale.mul_(2.0)
    loss.backward()
    assert torch.equal(model.lin.weight.grad, expected)
