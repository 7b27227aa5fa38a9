"""Passes are functions of immutable inputs: the direct plan, the fused direct update graphs and the
Mono-Forward heads are built from the traced graph, its units, the emitted "unit_error" graph and
the parameters, never from the compiled program or the runtime (which only call them)."""
import ast
import dataclasses
import pathlib

import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.passes.direct import draw_projections, plan_direct, project_dense
from fbcompile.passes.direct_graph import build_direct_gradients, build_unlocked_step, unit_gradients
from fbcompile.passes.forward import build_forward, build_unit_forwards
from fbcompile.passes.heads import attach_heads
from fbcompile.passes.prune import GradientSubgraph

pytestmark = pytest.mark.usefixtures("one_thread")
PASSES = pathlib.Path(fbcompile.__file__).parent / "passes"
LATER_STAGES = ("program", "executable", "compiler", "runtime")


def test_no_pass_takes_or_imports_the_program_or_a_later_stage():
    for path in sorted(PASSES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")
                assert not set(module) & set(LATER_STAGES), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(set(a.name.split(".")) & set(LATER_STAGES) for a in node.names), path.name
            elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                assert "program" not in names, f"{path.name}: {getattr(node, 'name', 'lambda')} takes the program"


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.randn(4, 5, dtype=torch.float64)


def _local_autograd(traced, partition, x, plan, deltas_of):
    """Reference: every unit run on its detached inputs, its trainable parameters' gradients by
    autograd with ``deltas_of(unit index, outputs)`` as the gradient of its outputs."""
    env, grads = {n: v for n, v in zip([n for n in traced.graph.nodes if n.op == "placeholder"], (x,))}, {}
    for stage in build_unit_forwards(traced, partition):
        outputs = stage.module(*(env[src].detach() for src in stage.inputs))
        env.update(zip(stage.outputs, outputs))
        names = plan.params.get(stage.unit.index)
        if names:
            params = [traced.get_parameter(name) for name in names]
            found = torch.autograd.grad(outputs, params, deltas_of(stage.unit.index, outputs))
            grads.update(zip(names, found))
    return grads


def test_direct_update_graphs_from_the_analysis_alone_are_local_autograd():
    model, x = _mlp()
    program = fbcompile.compile(model, x)
    traced, partition = program.traced, program.partition
    gradients = unit_gradients(traced, partition, program.feedback_graph("unit_error"))
    plan = plan_direct(traced, partition, dict(model.named_parameters()))
    assert plan.output_units == (2,) and plan.hidden_units == (0, 1)
    projections = draw_projections(plan, init="he_uniform", fan="features", scale=1.0, seed=3)
    error, signal = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def deltas_of(unit, outputs):
        if unit in plan.output_units:
            return (error,)
        return tuple(project_dense(signal, projections[p.index], p.batch_axis) for p in plan.of_unit(unit))

    reference = _local_autograd(traced, partition, x, plan, deltas_of)
    fused = build_direct_gradients(gradients, plan, projections, hidden=True, labels=False)
    taps = [key for kind, key in fused.inputs if kind == "tap"]
    with torch.no_grad():
        _, tap_values = build_forward(traced, taps)(x)
        by_tap = dict(zip(taps, tap_values))
        args = [signal if kind == "signal" else error if kind == "error" else by_tap[key] for kind, key in fused.inputs]
        got = dict(zip(fused.params, fused.module(*args)))
    assert set(got) == set(reference) == {name for name, _ in model.named_parameters()}
    for name, grad in got.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-13, atol=1e-15)

    step = build_unlocked_step(gradients, plan, projections, [0, 1, 2], hidden=True, labels=False)
    handed, order = {}, []

    def unit_done(index, names, grads):
        order.append(index)
        handed.update(zip(names, grads))

    with torch.no_grad():
        outputs, _ = step.module(x, signal, unit_done)
    torch.testing.assert_close(outputs[0], model(x), rtol=0, atol=0)
    assert order == [0, 1] and set(handed) == {q for u in plan.hidden_units for q in plan.params[u]}
    for name, grad in handed.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-13, atol=1e-15)


def test_which_parameters_train_is_an_input_of_the_plan_and_the_heads():
    model, x = _mlp()
    program = fbcompile.compile(model, x)
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    params = dict(model.named_parameters())
    plan = plan_direct(program.traced, program.partition, params)
    assert plan.hidden_units == (0,) and 1 not in plan.params
    stages = build_unit_forwards(program.traced, program.partition)
    heads, head_stages = attach_heads(program.traced, program.partition, stages, params, 3, output_head="linear")
    assert [head.index for head in heads] == [0, 2] and len(head_stages) == 3
    assert head_stages[1].head is None and head_stages[1].module is stages[1].module
    again, _ = attach_heads(program.traced, program.partition, stages, params, 3, output_head="linear")
    for (name, value), (_, other) in zip(heads.state_dict().items(), again.state_dict().items()):
        assert torch.equal(value, other), name        # seeded: the same inputs give the same heads


def test_a_unit_gradient_graph_reading_more_than_its_deltas_and_taps_is_refused_when_asked_for():
    model, x = _mlp()
    program = fbcompile.compile(model, x)
    gradients = unit_gradients(program.traced, program.partition, program.feedback_graph("unit_error"))
    good = gradients.graph(1)
    assert {kind for kind, _ in good.inputs} == {"cut", "tap"}
    reads_output = GradientSubgraph(good.module, good.inputs + (("output", 0),), good.params)
    broken = dataclasses.replace(gradients, pruned={**gradients.pruned, 1: reads_output})
    assert broken.graph(0) is gradients.graph(0)          # the other units are still served
    with pytest.raises(FBCompileError, match=r"unit 1's gradient graph reads \[\('output'"):
        broken.graph(1)
