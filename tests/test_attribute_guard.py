"""Plain module attributes after compiling (fbcompile.attribute_guard): a capture reads them once,
so a drop-path rate, a temperature or a dropout probability changed afterwards changed the model
but not the program, silently; now the next run is refused, before anything changes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from helpers import compare_with_autograd, same, snapshot


class DropPath(nn.Module):
    """timm's DropPath: the identity at rate 0, decided in Python."""

    def __init__(self, rate):
        super().__init__()
        self.drop_prob = rate

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty(x.shape[0], 1).bernoulli_(keep) / keep


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.temperature = nn.Linear(6, 3), 1.0

    def forward(self, x):
        return self.lin(x) / self.temperature


def _batch():
    torch.manual_seed(0)
    return torch.randn(5, 6), torch.randint(0, 3, (5,))


def test_a_drop_path_rate_changed_after_compiling_is_refused_before_anything_changes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), DropPath(0.0), nn.Linear(8, 3))
    x, y = _batch()
    learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
    learner.step(x, y, F.cross_entropy)
    model[1].drop_prob = 0.3
    before = snapshot(model, learner)
    with pytest.raises(FBCompileError, match=r"1\.drop_prob of Sequential is 0\.3 but was 0\.0"):
        learner.step(x, y, F.cross_entropy)
    assert same(before, snapshot(model, learner))
    fbcompile.learner(fbcompile.compile(model, x), "bp").step(x, y, F.cross_entropy)   # compiled again: runs


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_temperature_is_checked_by_every_run_and_may_come_back(frontend):
    torch.manual_seed(2)
    model = Tempered()
    x, y = _batch()
    program = fbcompile.compile(model, x, frontend=frontend)
    model.temperature = 2.0
    with pytest.raises(FBCompileError, match="temperature"):
        program.propagate_error(x, torch.randn(5, 3))
    model.temperature = 1.0
    out = fbcompile.learner(program, "dfa").step(x, y, F.cross_entropy).output
    assert torch.allclose(out, model(x))


def test_a_dropout_probability_bound_at_capture_is_guarded():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 3))
    x, y = _batch()
    learner = fbcompile.learner(fbcompile.compile(model, x), "drtp")
    model[1].p = 0.5
    with pytest.raises(FBCompileError, match=r"1\.p of Sequential"):
        learner.step(x, y, F.cross_entropy)


def test_attributes_that_are_not_plain_values_are_not_guarded():
    torch.manual_seed(4)
    model = Tempered()
    model.history = []                  # a list changes in place: not a value a capture holds
    x, y = _batch()
    learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
    model.history.append(1.0)
    model.notes = "added after compiling"
    assert learner.step(x, y, F.cross_entropy).loss > 0


class Pooling(nn.Module):
    """Hugging Face Funnel's bookkeeping: forward sets ``pooling_mult`` before it reads it and doubles
    it at each pooling, so every eager call leaves it changed; the program's runs were refused after
    one eager call of the model. A rate the capture left alone is still guarded."""

    def __init__(self):
        super().__init__()
        self.lin, self.pooling_mult, self.scale = nn.Linear(6, 6), None, 0.5

    def forward(self, x):
        self.pooling_mult = 1
        h = torch.tanh(self.lin(x))
        self.pooling_mult *= 2
        return h * (self.scale * self.pooling_mult)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attributes_forward_sets_for_itself_are_not_guarded(frontend):
    torch.manual_seed(3)
    model, x = Pooling().double(), torch.randn(4, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    model(x)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12
    model.scale = 0.25
    with pytest.raises(FBCompileError, match="attribute scale of Pooling is 0.25 but was 0.5"):
        program.propagate_error(x, torch.randn(4, 6, dtype=torch.float64))
