"""The one reverse walk (fbcompile.passes.walk): verification's eager per-unit feedback map and the
emitted feedback graph both run it, so on the same rules they give the same numbers.

For every unit of the built-in models (float64), verification's G_u (``unit_problem(...).feedback``,
eager tensors through the walk) is compared with the cut-mode feedback graph ("unit_error", fx
proxies through the walk) emitted with the same rules: given delta_u at each unit's outputs, the
feedback at each unit input."""
import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.context import RuleContext
from fbcompile.models import build_model
from fbcompile.passes.feedback import emit_feedback
from fbcompile.passes.forward import build_forward
from fbcompile.passes.walk import FanIn, left_sum, walk_back
from fbcompile.trace import info, preserved_state
from fbcompile.verify.evaluate import feedback_pieces, forward_values, pieces, unit_problem

pytestmark = pytest.mark.usefixtures("one_thread")


class Chunked(nn.Module):
    """A tuple value (chunk) read element by element and whole (cat), and a value read three times
    inside one unit: the walk's per-element sums and fan-out sums."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        a, b = h.chunk(2, dim=1)
        whole = torch.stack(h.chunk(2, dim=1)[1:]).sum(0)          # a slice of a tuple, read whole
        mixed = torch.cat([b, a], dim=1) * h + torch.sigmoid(a).repeat(1, 2) + whole.sum(1, keepdim=True)
        return self.fc2(mixed + h)


CASES = {
    "mlp": lambda: (build_model("mlp", (1, 6, 6), 5, width=10, depth=3), (4, 1, 6, 6), "layer"),
    "lenet": lambda: (build_model("lenet", (1, 32, 32), 5), (2, 1, 32, 32), "layer"),
    "resnet-small": lambda: (build_model("resnet-small", (3, 16, 16), 5), (2, 3, 16, 16), "layer"),
    "mixer": lambda: (build_model("mixer", (3, 16, 16), 5), (2, 3, 16, 16), "layer"),
    "chunked-layer": lambda: (Chunked(), (5, 6), "layer"),
    "chunked-module": lambda: (Chunked(), (5, 6), ("module", 1)),
}


def _cut_feedback(program, graph, deltas: dict, inputs: tuple) -> dict:
    """The cut graph's feedback per (unit index, unit input), run on the forward's own taps."""
    taps = [key for kind, key in graph.inputs if kind == "tap"]
    with torch.no_grad(), preserved_state(program.model):
        _, tap_values = build_forward(program.traced, taps)(*inputs)
        by_tap = dict(zip(taps, tap_values))
        args = [deltas[key] if kind == "cut" else by_tap[key] if kind == "tap"
                else program.params[graph.slot_params[key]] for kind, key in graph.inputs]
        values, _ = graph.module(*args)
    return dict(zip(graph.boundary, values))


@pytest.mark.parametrize("case", sorted(CASES))
def test_verification_and_the_feedback_graph_walk_units_alike(case):
    torch.manual_seed(0)
    model, shape, grouping = CASES[case]()
    model = model.double()
    x = torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(model, x, units=grouping)
    graph = emit_feedback(program.traced, program.rules, program.partition, "unit_error")
    deltas = {o.name: torch.randn(info(o).shape, dtype=torch.float64) for u in program.units for o in u.outputs}
    by_input = _cut_feedback(program, graph, deltas, (x,))
    values = forward_values(program, (x,))
    compared = exact = 0
    for unit in program.units:
        if not unit.inputs or not unit.outputs:
            continue
        problem = unit_problem(program, unit, values)
        seeds = tuple(p for o in unit.outputs for p in pieces(deltas[o.name]))
        with torch.no_grad():
            walked = problem.feedback(*seeds)
        emitted = [p for src in unit.inputs
                   for p in feedback_pieces(values[(src.name, None)], by_input[(unit.index, src)])]
        assert len(walked) == len(emitted) > 0
        for ours, theirs in zip(walked, emitted):
            assert theirs.abs().max() > 0          # feedback reached every input piece
            torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15 * float(theirs.abs().max()))
        if all(program.rules[n].kind_for(RuleContext(n)) in ("exact", "linearised") for n in unit.nodes
               if n in program.rules):
            # error maps that are J^T ("linearised" rules differ in their target map only): the
            # walk's G_u is J_{F_u}^T, autograd's vjp of the unit's forward map
            _, pullback = torch.func.vjp(problem.forward, *problem.inputs)
            for ours, reference in zip(walked, pullback(seeds)):
                torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14 * float(reference.abs().max()))
            exact += 1
        compared += 1
    assert compared >= 2 and exact >= 1


def test_fan_in_sums_from_the_left_per_tuple_element_and_once():
    """c_1 + c_2 + c_3 folded from the left, per element of a tuple value, formed once; a slice's
    feedback goes to the elements it selected."""
    gm = fbcompile.compile(Chunked(), torch.randn(5, 6)).traced
    chunk = next(n for n in gm.graph.nodes if info(n).is_tuple)
    h = chunk.args[0]
    calls = []

    def total(parts, name):
        calls.append(name)
        return left_sum(parts, lambda a, b: f"({a}+{b})")

    fanin = FanIn(total)
    for value in ("c1", "c2", "c3"):
        fanin.add(h, value)
    fanin.add(chunk, ["p", None])
    fanin.add(chunk, ["q", "r"])
    assert fanin.incoming(h) == "((c1+c2)+c3)" and fanin.incoming(h) == "((c1+c2)+c3)"
    assert fanin.incoming(chunk) == ["(p+q)", "r"]
    assert calls == [f"{h.name}_sum", f"{chunk.name}_0_sum", f"{chunk.name}_1_sum"]     # each once
    assert left_sum([], None) is None
    sliced = next(n for n in gm.graph.nodes if info(n).role == "select" and isinstance(info(n).select_index, tuple))
    assert info(sliced).select_index == (1,)                                      # chunk(...)[1:]
    fanin.select(sliced, ["s"])
    assert fanin.parts[(sliced.args[0], 1)] == ["s"] and fanin.origins[(sliced.args[0], 1)] == [sliced]
    assert (sliced.args[0], 0) not in fanin.parts


def test_walk_back_visits_consumers_before_their_sources():
    gm = fbcompile.compile(Chunked(), torch.randn(5, 6)).traced
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    visited = []
    fanin = FanIn(lambda parts, name: left_sum(parts, lambda a, b: a + b))

    def visit(node):
        visited.append(node)
        for _, _, src in info(node).call.active:
            assert src not in visited
            fanin.add(src, 1.0 if not info(src).is_tuple else [1.0] * len(info(src).shape), origin=node)

    walk_back([n for n in gm.graph.nodes if info(n).active], fanin, visit)
    assert visited == sorted(visited, key=order.__getitem__, reverse=True) and len(visited) > 5
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert fanin.incoming(x) == 1.0              # x is read once (by fc1)
    h = next(n for n in gm.graph.nodes if info(n).is_tuple).args[0]
    readers = [u for u in h.users if info(u).role == "op"]
    assert len(readers) == 4 and fanin.incoming(h) == 4.0      # two chunks, the product and the residual add
