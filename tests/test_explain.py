"""explain(), the generated feedback code and its metadata; the custom-rule example runs."""
import ast
import pathlib
import runpy

import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.explain import explain_rows
from fbcompile.registry import all_rules
from fbcompile.trace import META

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A module call, a parameter through get_attr, fan-out and a pooling tap."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        h = (h + h).flatten(1)
        return F.linear(h, self.w)


def program():
    model = Net().double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    return fbcompile.compile(model, x)


def test_explain_lists_every_forward_node_with_rule_condition_kind_and_feedback():
    prog = program()
    text = prog.explain()
    lines = text.splitlines()
    assert lines[0].startswith("Net: condition T") and lines[1].split() == [
        "node", "op", "rule", "condition", "kind", "unit", "feedback"]
    rows = {r["node"]: r for r in explain_rows(prog)}
    assert list(rows) == [n.name for n in prog.traced.graph.nodes]
    assert rows["x"]["op"] == "input" and rows["w"]["op"] == "param" and rows["output"]["op"] == "output"
    assert rows["conv"]["rule"] == "conv2d.transpose" and rows["conv"]["condition"] == "T"
    assert rows["conv"]["kind"] == "exact" and rows["max_pool2d"]["rule"] == "max_pool2d.unpool"
    graph_names = {n.name for n in prog.feedback["error"].module.graph.nodes}
    # the add of two equal-shape values passes the feedback on unchanged: it emits no node
    assert rows["add"]["rule"] == "add.add_transpose" and rows["add"]["feedback"] == "-"
    for name in ("conv", "tanh", "max_pool2d", "flatten", "linear"):
        emitted = rows[name]["feedback"].split(", ")
        assert emitted != ["-"] and set(emitted) <= graph_names, name
        assert all(e.startswith(name) for e in emitted if not e.startswith("fb")), (name, emitted)
        assert any(line.split()[0] == name and rows[name]["rule"] in line for line in lines[3:])


def test_feedback_code_is_python_named_after_forward_nodes():
    prog = program()
    code = prog.feedback_code
    tree = ast.parse(code)
    assert any(isinstance(node, ast.FunctionDef) and node.name == "forward" for node in ast.walk(tree))
    for name in ("grad_linear", "linear_matmul", "h_tanh", "max_pool2d_indices", "conv_conv_adjoint"):
        assert name in code, name
    for mode in ("target", "difference"):
        ast.parse(prog.feedback_graph(mode).module.code)


def test_every_feedback_node_records_source_and_rule():
    prog = program()
    forward_names = {n.name for n in prog.traced.graph.nodes}
    rule_names = {r.name for r in all_rules()}
    for mode in ("error", "target", "difference"):
        graph = prog.feedback_graph(mode)
        for node in graph.module.graph.nodes:
            meta = node.meta.get(META)
            if node.op == "placeholder":
                assert meta["input"][0] in ("output", "tap", "slot", "cut"), (mode, node.name)
            elif node.op != "output":
                assert meta["source"] in forward_names, (mode, node.name, meta)
                assert meta["rule"] in rule_names or meta["role"] == "fanout", (mode, node.name, meta)


def test_custom_rule_example_runs_and_is_exact():
    for _ in range(2):       # re-running re-registers with replace=True
        namespace = runpy.run_path(str(ROOT / "examples" / "custom_rule.py"), run_name="custom_rule")
        report = namespace["main"]()
    rows = {r["node"]: r for r in report.rows}
    assert rows["act"]["op"] == "scaled_softsign" and rows["cumsum"]["op"] == "cumsum"
    assert all(r["tjml_rel"] < 1e-10 for r in report.rows)
    # the symbolic target map: varsigma'(sigma(x)) = sigma'(x)
    model = namespace["ScaledSoftsign"](1.5)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    prog = fbcompile.compile(nn.Sequential(model), x.reshape(1, -1))
    node = next(iter(prog.rules))
    varsigma = namespace["derived"](fbcompile.context.EagerContext(node, {}, prog.model)).varsigma
    h = model(x).requires_grad_()
    slope, = torch.autograd.grad(varsigma(h).sum(), h)
    assert torch.allclose(slope, 1.5 / (1 + x.abs()) ** 2, rtol=1e-10)
