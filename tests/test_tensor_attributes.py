"""Plain tensor attributes and assignments to model state in forward (fbcompile.tensor_attributes).

Each case here was silently wrong before:
- torch.fx computed a value derived from a plain tensor attribute (``self.scale.exp()``) once, at
  trace time, so an in-place change afterwards did not reach the program;
- replacing the attribute (``model.scale = torch.tensor(3.)``) left both front ends computing with
  the old object;
- ``self.steps += 1`` on a buffer left an fx Proxy in the user's module (compile corrupted the
  model), and torch.export refused it, although it is the same counter as ``add_(1)``;
- torch.export ran forward's writes on plain tensor attributes while capturing (a counter advanced
  by compile), and a counter held as a plain tensor attribute was not rolled back by a failed step.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fbcompile
from fbcompile.errors import FBCompileError, NonFiniteError, UntraceableModelError
from helpers import compare_with_autograd

FRONTENDS = ["fx", "export"]


class ScaledByAttribute(nn.Module):
    """y = (W x + b) * exp(s) + t with s, t plain tensor attributes (not registered buffers)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.log_scale = torch.randn(4)
        self.shift = torch.randn(4)

    def forward(self, x):
        return self.lin(x) * self.log_scale.exp() + self.shift


class Counting(nn.Module):
    """A counter spelled ``+=`` (fx records ``steps + 1`` assigned back), as a buffer or as a plain
    tensor attribute."""

    def __init__(self, registered: bool):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        if registered:
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        else:
            self.steps = torch.zeros((), dtype=torch.long)

    def forward(self, x):
        self.steps += 1
        return self.lin(x)


def double_model():
    torch.manual_seed(0)
    model = ScaledByAttribute().double()
    model.log_scale, model.shift = model.log_scale.double(), model.shift.double()
    return model


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_values_computed_from_a_tensor_attribute_follow_in_place_changes(frontend):
    model = double_model()
    program = fbcompile.compile(model, torch.randn(2, 5, dtype=torch.float64), frontend=frontend)
    with torch.no_grad():
        model.log_scale.copy_(torch.randn(4))            # a schedule, or a checkpoint loaded after compiling
        model.shift.copy_(torch.randn(4))
    x = torch.randn(3, 5, dtype=torch.float64)
    result = fbcompile.learner(program, "bp").step(x, torch.randn(3, 4, dtype=torch.float64), F.mse_loss)
    assert torch.allclose(result.output, model(x), rtol=1e-14, atol=1e-14)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_replacing_a_tensor_attribute_is_refused_by_name(frontend):
    model = double_model()
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 5, dtype=torch.float64),
                                                  frontend=frontend), "bp")
    weight = model.lin.weight.detach().clone()
    model.log_scale = torch.randn(4, dtype=torch.float64)
    with pytest.raises(FBCompileError, match="tensor attribute log_scale .*replaced"):
        learner.step(torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), F.mse_loss)
    assert torch.equal(model.lin.weight, weight)


class LazyPositions(nn.Module):
    """timm's ConViT pattern: a position buffer built in forward whenever the sequence length
    changes (registered empty, so .to() moves it), read by a position projection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 4)
        self.register_buffer("positions", torch.zeros(1, 1, 2), persistent=False)

    def forward(self, x):
        if self.positions.shape[1] != x.shape[1]:
            self.positions = self.positions_for(x.shape[1])
        return x + self.proj(self.positions)

    def positions_for(self, length: int) -> torch.Tensor:
        positions = torch.zeros(1, length, 2)
        positions[:, :, 0] = torch.arange(length, dtype=torch.float32) / length
        positions[:, :, 1] = 1.0
        return positions.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)


def test_a_buffer_forward_builds_for_itself_may_be_replaced_by_the_model_later():
    """ConViT's propagate_error was refused after one eager forward of the model: export computes the
    buffer in the graph, so the program never reads it, and the guard compared every buffer. It
    compares the buffers the program reads (a buffer the graph reads is still guarded)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), LazyPositions(), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    model(x)                                            # builds a new buffer object
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12
    program = fbcompile.compile(model, x, frontend="export")      # the buffer built: now read as a buffer
    model[1].positions = model[1].positions.clone()
    with pytest.raises(FBCompileError, match="buffer 1.positions of Sequential was replaced"):
        program.propagate_error(x, torch.randn(3, 5, 3, dtype=torch.float64))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_capture_leaves_tensor_attributes_plain_and_unwritten(frontend):
    model = Counting(registered=False)
    keys = list(model.state_dict())
    steps = model.steps
    fbcompile.compile(model, torch.randn(2, 5), frontend=frontend)
    assert vars(model)["steps"] is steps and "steps" not in model._buffers
    assert list(model.state_dict()) == keys
    assert int(model.steps) == 0                          # compile ran forward, but counted nothing


@pytest.mark.parametrize("registered", [True, False], ids=["buffer", "attribute"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_counter_spelled_plus_equals_counts_once_per_step(frontend, registered):
    torch.manual_seed(2)
    model = Counting(registered)
    steps = model.steps
    program = fbcompile.compile(model, torch.randn(2, 5), frontend=frontend)
    assert model.steps is steps and int(steps) == 0
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    for algorithm in ("bp", "drtp", "dtp"):
        fbcompile.learner(program, algorithm).step(x, y, F.cross_entropy)
    assert model.steps is steps and int(steps) == 3
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        fbcompile.learner(program, "bp").step(bad, y, F.cross_entropy)
    assert int(steps) == 3                                # the failed step rolled the count back


def test_an_attribute_forward_sets_to_a_traced_value_is_not_left_behind():
    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.kept = None

        def forward(self, x):
            y = self.lin(x)
            self.kept, self.last = y, y                   # for inspection: not model state
            return y

    model = Recording()
    fbcompile.compile(model, torch.randn(2, 5), frontend="fx")
    assert model.kept is None and "last" not in vars(model)
    assert not any(isinstance(v, fx.Proxy) for m in model.modules() for v in vars(m).values())


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_tensor_that_requires_grad_but_is_no_parameter_is_refused(frontend):
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.temperature = torch.tensor(2.0, requires_grad=True)    # trained by autograd, not registered

        def forward(self, x):
            return self.lin(x) / self.temperature

    with pytest.raises(FBCompileError, match="'temperature', a tensor that requires grad"):
        fbcompile.compile(Tempered(), torch.randn(2, 5), frontend=frontend)


class ListedLayer(nn.Module):
    """A layer held in a plain list: not registered, so not among model.parameters()."""

    def __init__(self, trainable: bool):
        super().__init__()
        self.layers = [nn.Linear(5, 4).requires_grad_(trainable)]
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.layers[0](x)))


def test_a_trainable_layer_in_a_plain_list_is_refused_under_export():
    """torch.export lifts its weight as a detached alias: autograd would give it a gradient, a
    program none."""
    with pytest.raises(FBCompileError, match=r"'layers\[0\]\.weight', a tensor that requires grad"):
        fbcompile.compile(ListedLayer(trainable=True), torch.randn(2, 5), frontend="export")


def test_a_frozen_layer_in_a_plain_list_compiles_under_export_and_equals_autograd():
    torch.manual_seed(4)
    model = ListedLayer(trainable=False).double()
    model.layers[0].double()
    x = torch.randn(3, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="export")
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


class ListedScale(nn.Module):
    """A scale held in a plain list: torch.fx sees an ordinary tensor, not model state."""

    def __init__(self, derived: bool):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.scales = [torch.randn(4)]
        self.derived = derived

    def forward(self, x):
        scale = self.scales[0]
        assert scale.shape[0] == 4 and scale.dtype.is_floating_point      # metadata reads are fine
        return self.lin(x) * (scale.exp() if self.derived else scale)


def test_a_value_computed_from_a_tensor_in_a_plain_list_is_refused_by_fx():
    with pytest.raises(UntraceableModelError, match=r"computes exp on scales\[0\], a tensor held in a plain list"):
        fbcompile.compile(ListedScale(derived=True), torch.randn(2, 5), frontend="fx")


@pytest.mark.parametrize("derived,frontend", [(True, "auto"), (False, "fx"), (False, "export")])
def test_tensors_in_a_plain_list_follow_in_place_changes(derived, frontend):
    torch.manual_seed(5)
    model = ListedScale(derived).double()
    model.scales[0] = model.scales[0].double()
    program = fbcompile.compile(model, torch.randn(2, 5, dtype=torch.float64), frontend=frontend)
    with torch.no_grad():
        model.scales[0].copy_(torch.randn(4))
    x = torch.randn(3, 5, dtype=torch.float64)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12
