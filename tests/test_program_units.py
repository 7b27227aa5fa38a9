"""Per-unit pieces of a compiled program: gradient subgraphs and tapped unit stages."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.passes.prune import gradient_subgraph
from fbcompile.trace import info
from helpers import assert_a_step_learns, compare_with_autograd


def _program():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 16, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    return program, x


def _random_deltas(program):
    return {o.name: torch.randn(info(o).shape, dtype=torch.float64) for o in program.unit_outputs}


def test_a_unit_gradient_graph_reads_its_own_deltas_and_equals_the_whole_graph():
    program, x = _program()
    run = program.executable("unit_error")
    with torch.no_grad():
        _, taps = run.run_forward((x,))
    deltas = _random_deltas(program)
    every = run.unit_gradients(deltas, {}, taps)
    checked = 0
    for unit in program.units:
        if not unit.params:
            continue
        subgraph = program.unit_gradient_graph(unit.index)
        read = {key for kind, key in subgraph.inputs if kind == "cut"}
        assert read and read <= {o.name for o in unit.outputs}
        args = [taps[run.tap_index[key]] if kind == "tap" else deltas[key] for kind, key in subgraph.inputs]
        with torch.no_grad():
            one = dict(zip(subgraph.params, subgraph.module(*args)))
        assert set(one) == set(unit.params)
        for name, grad in one.items():
            torch.testing.assert_close(grad, every[name], rtol=1e-13, atol=0)
        checked += 1
    assert checked == 3


def test_tapped_unit_stages_return_the_values_the_forward_taps():
    program, x = _program()
    run = program.executable("unit_error")
    with torch.no_grad():
        _, taps = run.run_forward((x,))
        seen = {}

        def execute(stage, values):
            outputs, tap_values = stage.module(*values)
            seen.update(zip(stage.taps, tap_values))
            return outputs

        program.run_units((x,), None, stages=program.unit_forwards(tapped=True), execute=execute)
    assert any(key[1] is not None for key in seen)          # the max-pool indices are among them
    for key, value in seen.items():
        expected = taps[run.tap_index[key]]
        assert torch.equal(value, expected) if torch.is_tensor(value) else value == expected, key  # shape taps


def test_gradient_subgraph_names_a_parameter_the_graph_has_no_gradient_for():
    program, _ = _program()
    with pytest.raises(FBCompileError, match="no gradient for.*'9.weight'"):
        gradient_subgraph(program.feedback_graph("unit_error"), ["4.weight", "9.weight"])


class InterpolatedPositions(nn.Module):
    """timm's HieraDet (SAM2's Hiera) under torch.fx: a position embedding interpolated to the feature
    map's size, read from the input's shape before the first layer, so an activation only through
    the sizes it reads, and one value for the whole batch (1, C, H, W). It made a unit of its own,
    whose output has no batch axis: dfa, drtp and mf refused the model."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Conv2d(3, 4, 2, stride=2), nn.Linear(4, 3)
        self.positions = nn.Parameter(torch.randn(1, 4, 3, 3))

    def forward(self, x):
        positions = F.interpolate(self.positions, size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear")
        h = torch.tanh(self.embed(x) + positions)
        return self.head(h.mean((2, 3)))


def test_a_parameter_value_shared_by_the_batch_joins_the_unit_that_reads_it():
    torch.manual_seed(0)
    model, x = InterpolatedPositions().double(), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="fx")
    unit_of = program.partition.unit_of
    interpolate = next(n for n in unit_of if n.name == "interpolate")
    add = next(iter(interpolate.users))
    assert unit_of[interpolate] is unit_of[add] and interpolate not in unit_of[add].outputs
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12
    y = torch.tensor([0, 2, 1, 1, 0])
    for algorithm in ("dtp", "dfa", "drtp", "mf"):
        assert_a_step_learns(model, fbcompile.learner(program, algorithm, seed=1), x, y, F.cross_entropy)
