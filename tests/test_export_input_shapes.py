"""Input shapes a torch.export program holds for (fbcompile/input_shapes.py): torch.export fixes
every size but dim 0 and keeps its guards on dim 0 apart, so other shapes are refused up front,
before anything changes; torch.fx programs take any shape."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError

from helpers import compare_with_autograd, same, snapshot


class BatchBranch(nn.Module):
    """torch.export keeps one side of a branch on the batch size, and a guard on it apart."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x.shape[0] > 4:
            h = h * 2
        return self.b(h)


class FixedBatch(nn.Module):
    """A per-sample offset for exactly two samples: torch.export makes the batch a constant."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.register_buffer("offset", torch.randn(2, 3))

    def forward(self, x):
        return torch.tanh(self.a(x) + self.offset)


def test_export_programs_refuse_batch_sizes_their_capture_does_not_hold_for():
    """Compiled at batch 2, the branch above was dropped: 50% off autograd at batch 8 before."""
    torch.manual_seed(0)
    model = BatchBranch().double()
    program = fbcompile.compile(model, torch.randn(2, 6, dtype=torch.float64), frontend="export")
    assert (program.input_shapes.inputs[0].low, program.input_shapes.inputs[0].high) == (2, 4)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12      # inside the range: exact
    with pytest.raises(FBCompileError, match=r"dim 0 \(the batch\) of input 0 from 2 to 4.*this one has 8"):
        program.propagate_error(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))
    learner = fbcompile.learner(program, "dtp")
    before = snapshot(model, learner)
    with pytest.raises(FBCompileError, match="this one has 8"):
        learner.step(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)), F.cross_entropy)
    assert same(before, snapshot(model, learner))


def test_a_batch_size_the_model_fixes_admits_only_that_size():
    model = FixedBatch().double()
    program = fbcompile.compile(model, torch.randn(2, 6, dtype=torch.float64), frontend="export")
    assert (program.input_shapes.inputs[0].low, program.input_shapes.inputs[0].high) == (2, 2)
    with pytest.raises(FBCompileError, match="dim 0 .* of input 0 of exactly 2"):
        program.propagate_error(torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64))


def test_export_programs_of_batch_independent_models_take_any_batch():
    program = fbcompile.compile(nn.Sequential(nn.Linear(6, 3), nn.Tanh()), torch.randn(2, 6), frontend="export")
    assert (program.input_shapes.inputs[0].low, program.input_shapes.inputs[0].high) == (2, None)
    program.propagate_error(torch.randn(9, 6), torch.randn(9, 3))


class PositionTable(nn.Module):
    """Adds a learned position vector per token: torch.export bakes the example's length in."""

    def __init__(self):
        super().__init__()
        self.positions, self.a = nn.Parameter(torch.randn(16, 4)), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x + self.positions[: x.shape[1]])


def test_export_programs_refuse_other_sizes_than_the_batch_fx_programs_take_them():
    """Compiled at length 1 the export program adds position 0 to every token of a longer input
    (broadcast); at length 7 it fails inside the forward. Both are refused up front, by name."""
    model = PositionTable().double()
    for length in (1, 7):
        program = fbcompile.compile(model, torch.randn(2, length, 4, dtype=torch.float64), frontend="export")
        with pytest.raises(FBCompileError, match=rf"input 0 of shape \(batch, {length}, 4\); this one has shape \(3, 9, 4\)"):
            program.propagate_error(torch.randn(3, 9, 4, dtype=torch.float64), torch.randn(3, 9, 3, dtype=torch.float64))
    program = fbcompile.compile(model, torch.randn(2, 1, 4, dtype=torch.float64), frontend="fx")
    assert program.input_shapes is None
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12


class MaskedAttention(nn.Module):
    """A second input without a batch dim (a (length, length) mask): its dim 0 is fixed, x's is not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, mask):
        return torch.softmax(self.a(x) @ x.transpose(1, 2) + mask, -1) @ x


def test_each_input_keeps_its_own_dim_0_sizes():
    mask = torch.triu(torch.full((7, 7), -1e4, dtype=torch.float64), 1)
    model = MaskedAttention().double()
    program = fbcompile.compile(model, (torch.randn(2, 7, 4, dtype=torch.float64), mask), frontend="export")
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    ours = program.propagate_error((x, mask), torch.randn(5, 7, 4, dtype=torch.float64))    # batch 5: fine
    assert ours[0].shape == x.shape
    with pytest.raises(FBCompileError, match="input 1 of exactly 7"):
        program.propagate_error((x, mask[:6]), torch.randn(5, 7, 4, dtype=torch.float64))
