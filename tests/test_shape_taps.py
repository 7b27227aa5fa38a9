"""A forward value a rule reads only for its shape is not tapped (issue 14): ``ctx.saved_shape``
gives a static shape, or a shape tap (the value's torch.Size), never the tensor."""
import torch
from torch import nn

import fbcompile
from fbcompile.context import SHAPE
from fbcompile.verify.checks import autograd_gradients, relative_error


class Broadcasts(nn.Module):
    """Residual add of equal shapes, an add broadcasting a per-channel mean, a flatten and a mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, 5)

    def forward(self, x):
        h = self.conv(x)
        m = h.mean((2, 3), keepdim=True)          # (N, 4, 1, 1): added back with broadcasting
        r = self.conv2(torch.tanh(h)) + (h + m)     # equal shapes: nothing to sum
        return self.head(torch.flatten(r, 1)) + r.sum((1, 2, 3)).unsqueeze(1)


def _tensor_taps(graph):
    return {key for kind, key in graph.inputs if kind == "tap" and key[1] != SHAPE}


def test_shape_only_reads_create_no_tap_and_stay_exact_at_other_batch_sizes():
    torch.manual_seed(3)
    model = Broadcasts().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    names = {n.target if n.op == "call_method" else n.name: n.name for n in program.traced.graph.nodes}
    graph = program.feedback["error"]
    taps = _tensor_taps(graph)
    shape_taps = {key for kind, key in graph.inputs if kind == "tap" and key[1] == SHAPE}
    adds = [n.name for n in program.traced.graph.nodes if n.name.startswith("add")]
    mean = next(n for n in names if "mean" in n)
    # m (mean's output) and the adds' outputs (flatten's and sum's input r among them) are read
    # only for their shapes; flatten's output is a real tap (the Linear's weight gradient reads it)
    read_for_shape = {names[mean], *adds}
    assert len(adds) == 3 and ("flatten", None) in taps
    assert not {(name, None) for name in read_for_shape} & taps, taps
    assert (names[mean], SHAPE) in shape_taps          # the broadcast add sums g to m's shape at run time
    # the conv's output h is read by nothing but shapes and tanh (which taps its own output)
    assert ("conv", None) not in taps
    # exact, also at a batch size other than the compiled one (the shape taps follow the batch)
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 6, 6, dtype=torch.float64)
        error = torch.randn(batch, 5, dtype=torch.float64)
        ref_inputs, ref_params = autograd_gradients(model, xb, error)
        model.zero_grad(set_to_none=True)
        assert relative_error(program.propagate_error(xb, error), ref_inputs[0]) < 1e-10
        for name, param in model.named_parameters():
            assert relative_error(param.grad, ref_params[name]) < 1e-10, name


def test_update_unlocked_unit_stages_return_shape_taps():
    """The per-unit forwards (update-unlocked execution) return a shape tap as a torch.Size."""
    torch.manual_seed(4)
    model = Broadcasts().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    stages = program.unit_forwards(tapped=True)
    found = []
    env = {program.inputs[0]: x}
    for stage in stages:
        outputs, taps = stage.module(*[env[s] for s in stage.inputs])
        env.update(zip(stage.outputs, outputs))
        found += [(key, value) for key, value in zip(stage.taps, taps) if key[1] == SHAPE]
    for key, value in found:
        assert isinstance(value, torch.Size) and value[0] == 3, key
