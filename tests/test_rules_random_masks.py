"""Alpha dropout (nn.AlphaDropout, nn.FeatureAlphaDropout), the randomized leaky ReLU (nn.RReLU) and
ATen's native_dropout (what torch.export writes dropout as in a decomposed program), rules/dropout.py, in float64 through both front ends: every rule's TJML residual and adjoint gap, the
same draws as the model's own under one seed (so train-mode gradients equal autograd's), the
conditions P and I, and DTP's small-beta limit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import ConditionError
from fbcompile.verify.checks import rule_errors

from helpers import assert_a_step_learns, assert_equals_autograd_under_one_seed, randomise_vectors
from test_conditions import assert_condition
from test_rules_elementwise import dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-10

LAYERS = {
    "alpha_dropout": lambda: nn.AlphaDropout(0.3),
    "feature_alpha_dropout": lambda: nn.FeatureAlphaDropout(0.4),
    "alpha_dropout_function": lambda: Functional(lambda h, training: F.alpha_dropout(h, 0.2, training)),
    "rrelu": lambda: nn.RReLU(0.1, 0.4),
    "rrelu_function": lambda: Functional(lambda h, training: F.rrelu(h, 0.2, 0.3, training)),
    "native_dropout": lambda: Functional(lambda h, training: torch.native_dropout(h, 0.3, training)[0]),
}
OPS = {"alpha_dropout_function": "alpha_dropout", "rrelu_function": "rrelu"}


class Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h, self.training)


class Net(nn.Module):
    """Conv -> SELU -> the layer -> Linear: channels for the feature variant, a parameter on each side."""

    def __init__(self, layer):
        super().__init__()
        self.conv, self.layer, self.out = nn.Conv1d(3, 4, 1), layer, nn.Linear(20, 2)

    def forward(self, x):
        return self.out(self.layer(F.selu(self.conv(x))).flatten(1))


def _net(name, train):
    return randomise_vectors(Net(LAYERS[name]()).double()).train(train)


X = lambda: torch.randn(6, 3, 5, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_rules_are_exact(name, train, frontend):
    x = X()
    program = fbcompile.compile(_net(name, train), x, frontend=frontend)
    assert OPS.get(name, name) in {rule.op for rule in program.rules.values()}
    for node, (tjml, gap) in rule_errors(program, x).items():
        assert tjml < TOL and gap < TOL, (node, tjml, gap)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_train_mode_draws_the_models_own_masks(name, frontend):
    """Under one seed the compiled forward draws what the model draws, so input and parameter
    gradients equal autograd's."""
    model, x = _net(name, True), X()
    program = fbcompile.compile(model, x, frontend=frontend)
    error = torch.randn(6, 2, dtype=torch.float64)
    assert_equals_autograd_under_one_seed(model, program, x, error, seed=11)


def test_alpha_dropout_of_everything_gives_zero_and_zero_feedback():
    model = nn.Sequential(nn.Linear(3, 4), nn.AlphaDropout(1.0), nn.Linear(4, 2)).double().train()
    x = torch.randn(5, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert torch.equal(program.propagate_error(x, torch.randn(5, 2, dtype=torch.float64)), torch.zeros_like(x))


@pytest.mark.parametrize("train", [True, False])
def test_rrelu_is_inverted_exactly(train):
    """Every slope is positive (lower > 0): J = diag(m) is invertible, J^-1 = diag(1/m)."""
    assert_condition(nn.Sequential(nn.Tanh(), nn.RReLU(0.1, 0.4)).train(train), torch.randn(4, 5, dtype=torch.float64),
                     "I")


def test_alpha_dropout_pinv_and_its_refused_inverse():
    model = nn.Sequential(nn.Tanh(), nn.AlphaDropout(0.5)).double().train()
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_condition(model, x, "P")
    program = fbcompile.compile(model, x, condition="I")
    with pytest.raises(ConditionError, match="multiplied entries by zero"):
        program.propagate_error(x, torch.randn(4, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["alpha_dropout", "rrelu"])
def test_eval_mode_meets_the_small_beta_limit(name):
    model = randomise_vectors(nn.Sequential(nn.Linear(4, 6), LAYERS[name](), nn.Linear(6, 3)))
    assert dtp_angle(model, torch.randn(5, 4, dtype=torch.float64)) < 0.01


class DropoutThenAssigned(nn.Module):
    """Hugging Face BART's pattern: dropout in a model that also assigns into a view (an item
    assignment), so torch.export makes the program functional and writes the dropout as
    aten.native_dropout, a (values, keep) pair (refused before: no op was declared for it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.dropout(torch.tanh(self.a(x)), 0.4, self.training)
        h[:, 0] = self.b(x)[:, 1]
        return self.out(h)


def test_a_decomposed_export_trains_its_native_dropout_exactly():
    model, x = randomise_vectors(DropoutThenAssigned().double()).train(), torch.randn(7, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="export")
    assert "native_dropout" in {rule.op for rule in program.rules.values()}
    for node, (tjml, gap) in rule_errors(program, x).items():
        assert tjml < TOL and gap < TOL, (node, tjml, gap)
    assert_equals_autograd_under_one_seed(model, program, x, torch.randn(7, 3, dtype=torch.float64), seed=5)
    y = torch.randint(0, 3, (7,))
    for algorithm in ("bp", "dtp", "dfa", "mf"):
        assert_a_step_learns(model, fbcompile.learner(program, algorithm), x, y, F.cross_entropy)
