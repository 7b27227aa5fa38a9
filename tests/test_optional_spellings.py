"""Spellings from optional packages (torchvision's stochastic depth) are declared once the user's code
has imported the package, never by importing fbcompile. A stand-in ``torchvision.ops`` module
(fx-wrapped function and module class, torchvision's semantics) plays the real one."""
import subprocess
import sys
import types

import torch
import torch.fx
from torch import nn

import fbcompile
from fbcompile.ops import declared_ops

from helpers import compare_with_autograd


def stochastic_depth(input, p, mode, training=True):
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.dim() - 1) if mode == "row" else [1] * input.dim()
    mask = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    return input * mask.div_(1.0 - p)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p, mode):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop, self.head = nn.Linear(6, 6), StochasticDepth(0.3, "row"), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + self.drop(torch.tanh(self.fc(x))))


def test_stochastic_depth_is_declared_after_the_package_is_imported(monkeypatch):
    fake = types.ModuleType("torchvision.ops")
    fake.stochastic_depth, fake.StochasticDepth = stochastic_depth, StochasticDepth
    monkeypatch.setitem(sys.modules, "torchvision.ops", fake)
    model, x = Block().double().eval(), torch.randn(4, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert "stochastic_depth" in declared_ops()
    assert [n.name for n in program.rules if program.rules[n].op == "stochastic_depth"] == ["drop"]
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < 1e-10 and param_rel < 1e-10


def test_importing_fbcompile_imports_no_optional_package(tmp_path):
    code = "import sys, fbcompile; print(sorted(m for m in ('torchvision', 'transformers') if m in sys.modules))"
    # run outside the checkout, so the installed package is imported (as a user would)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
