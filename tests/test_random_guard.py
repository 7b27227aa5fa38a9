"""Random draws while a front end captures forward (fbcompile.random_guard): a draw made at capture
would be a constant of the program (the same noise at every step, a stochastic branch frozen), so
it is refused by name; torch.export records torch's own draws as graph nodes instead."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import UntraceableModelError
from fbcompile.frontends import frontend_of


class Noisy(nn.Module):
    """Adds fresh noise of a fixed shape at every call: no traced value in the draw."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin, self.dtype = nn.Linear(4, 4, dtype=dtype), dtype

    def forward(self, x):
        return self.lin(x) + torch.randn(4, dtype=self.dtype)


class CoinFlip(nn.Module):
    """Skips its layer at random, decided by ``draw()`` in Python."""

    def __init__(self, draw):
        super().__init__()
        self.lin, self.draw = nn.Linear(4, 4), draw

    def forward(self, x):
        return self.lin(x) if self.draw() < 0.5 else x


def test_a_torch_draw_on_no_traced_value_is_refused_by_fx():
    with pytest.raises(UntraceableModelError, match="torch's generator"):
        fbcompile.compile(Noisy(), torch.randn(2, 4), frontend="fx")


def test_auto_records_the_draw_through_export_and_draws_anew_at_every_step():
    torch.manual_seed(0)
    model = Noisy(torch.float64)
    program = fbcompile.compile(model, torch.randn(2, 4, dtype=torch.float64))
    assert frontend_of(program.traced)[0] == "export"
    learner = fbcompile.learner(program, "bp")
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    outputs = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        outputs.append(learner.step(x, y, F.mse_loss).output)
    torch.manual_seed(1)
    eager = model(x)
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], outputs[2])
    assert torch.allclose(outputs[0], eager, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_a_python_draw_is_refused_and_the_stream_put_back(frontend):
    state = random.getstate()
    with pytest.raises(UntraceableModelError, match="Python's random module"):
        fbcompile.compile(CoinFlip(random.random), torch.randn(2, 4), frontend=frontend)
    assert random.getstate() == state


def test_a_numpy_draw_is_refused():
    numpy = pytest.importorskip("numpy")
    with pytest.raises(UntraceableModelError, match="NumPy"):
        fbcompile.compile(CoinFlip(numpy.random.rand), torch.randn(2, 4), frontend="fx")
