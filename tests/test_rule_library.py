"""The rule library's shape: every rule name explain() prints is a def you can grep, no rule module
dispatches on op-name strings, and TP units come from op traits (units.py), not from a flag on the op."""
import ast
import inspect
import pathlib
import sys

import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import RuleError
from fbcompile.ops import Spellings, TappedForward, Training, declare_op, declared_ops
from fbcompile.passes.units import starts_unit
from fbcompile.registry import all_rules, register_rule

RULES_DIR = pathlib.Path(fbcompile.rules.__file__).resolve().parent


def _library_rules():
    return [r for r in all_rules() if r.error.__module__.startswith("fbcompile.rules.")]


def test_every_printed_rule_name_is_a_def_in_its_module():
    rules = _library_rules()
    assert len(rules) > 200 and len({r.op for r in rules}) > 60
    for rule in rules:
        function = rule.error
        module = sys.modules[function.__module__]
        assert "<" not in function.__qualname__, (rule.name, function.__qualname__)   # no closures
        assert rule.name == f"{rule.op}.{function.__qualname__}", (rule.name, function.__qualname__)
        assert getattr(module, function.__qualname__) is function, rule.name


# -- no dispatch on op-name strings ----------------------------------------------------------------
def _op_name_findings(source: str, op_names: set) -> list:
    """Lines of ``source`` that compare, test or index with an op's name: ``<...>.spec.name`` /
    ``op.name`` (and variables assigned from them), or a string literal that is a declared op name,
    used in ==, !=, in, endswith/startswith or as a dict key."""
    tree = ast.parse(source)
    tainted = set()

    def is_name_attr(node):
        if isinstance(node, ast.Attribute) and node.attr == "name":
            base = ast.unparse(node.value)
            return base.endswith("spec") or base.split(".")[-1].lstrip("_") in ("op", "spec")
        return isinstance(node, ast.Name) and node.id in tainted

    def names_op(node):
        if is_name_attr(node):
            return True
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_op(e) for e in node.elts)
        return False

    def literal_op_name(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value in op_names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(literal_op_name(e) for e in node.elts)

    def compares_op_names(node):
        operands = (node.left, *node.comparators)
        if any(names_op(x) for x in operands):
            return True
        # a literal op name against something called ``name`` (``name == "conv1d"``, ``op_name in (...)``);
        # other literals that happen to spell an op (``approximate == "tanh"``) are hyperparameters
        named = any(ast.unparse(x).endswith("name") for x in operands)
        return named and any(literal_op_name(x) for x in operands)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and is_name_attr(node.value):
            tainted.update(t.id for t in node.targets if isinstance(t, ast.Name))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and compares_op_names(node):
            found.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("endswith", "startswith") and is_name_attr(node.func.value)):
            found.append(node.lineno)
        elif isinstance(node, ast.Subscript) and names_op(node.slice):
            found.append(node.lineno)
    return found


def test_the_op_name_check_catches_string_dispatch():
    names = set(declared_ops())
    bad = ['conv = conv1d if name == "conv1d" else conv2d',
           'n = 1 if ctx.op_call.spec.name.endswith("1d") else 2',
           'fn = _MAPS[(ctx.op_call.spec.name, condition)]',
           'name = ctx.op_call.spec.name\nx = None if name in OUTPUT_KERNELS else 1',
           'if _op.name in ("max", "min"):\n    pass']
    for snippet in bad:
        assert _op_name_findings(snippet, names), snippet
    good = ['if mode == "constant":\n    pass', 'if approximate == "tanh":\n    pass',
            'spec = ctx.op_call.spec\nif spec is FLIP:\n    pass', 'message = f"{ctx.op_call.spec.name} drops entries"',
            'apply = get_op(op_name).apply']
    for snippet in good:
        assert not _op_name_findings(snippet, names), snippet


def test_no_rule_module_dispatches_on_op_name_strings():
    names = set(declared_ops())
    files = sorted(RULES_DIR.glob("*.py"))
    assert len(files) >= 15
    compares = 0
    for path in files:
        source = path.read_text()
        compares += sum(isinstance(n, ast.Compare) for n in ast.walk(ast.parse(source)))
        assert not _op_name_findings(source, names), (path.name, _op_name_findings(source, names))
    assert compares > 50   # the check read real code


# -- units from traits -----------------------------------------------------------------------------
def test_declare_op_has_no_unit_flag_and_no_unread_keyword():
    parameters = inspect.signature(declare_op).parameters
    assert "leader" not in parameters and "param_args" not in parameters
    with pytest.raises(RuleError, match="unknown keyword.*leader"):
        declare_op("test_unit_flag", lambda input: input, leader=True)


def test_grouped_declaration_gives_the_op_the_flat_keywords_give():
    def double(input):
        return 2 * input

    def double_tapped(input):
        return 2 * input, input

    def replay(extras, input):
        return 2 * input

    def param_grads(ctx, g):
        return {}

    def batch_local(ctx):
        return False

    class Doubler(nn.Module):
        pass

    spelling, binder = (lambda input: 2 * input), (lambda module: {})
    fields = ("modules", "functions", "methods", "inplace", "tapped", "extras", "replay", "param_grads", "batch_local")
    flat = declare_op("test_grouped", double, modules={Doubler: binder}, functions=[spelling], inplace=[spelling],
                      tapped=double_tapped, extras=("input",), replay=replay, param_grads=param_grads,
                      batch_local=batch_local, replace=True)
    flat = {f: getattr(flat, f) for f in fields}
    grouped = declare_op("test_grouped", double, Spellings({Doubler: binder}, (spelling,), inplace=(spelling,)),
                         tapped=TappedForward(double_tapped, ("input",), replay),
                         training=Training(param_grads, batch_local), replace=True)
    assert {f: getattr(grouped, f) for f in fields} == flat
    assert flat["tapped"] is double_tapped and flat["param_grads"] is param_grads and flat["extras"] == ("input",)
    with pytest.raises(RuleError, match="not both"):
        declare_op("test_grouped", double, Spellings(functions=(spelling,)), methods=[spelling], replace=True)
    with pytest.raises(RuleError, match="must name its extras"):
        declare_op("test_grouped", double, tapped=TappedForward(double_tapped, ()), replace=True)


def test_the_ops_that_start_units_are_the_weight_layers():
    library = {n: s for n, s in declared_ops().items() if s.apply.__module__.startswith("fbcompile.rules.")}
    leading = {n for n, s in library.items() if starts_unit(s)}
    assert leading == {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                       "layer_norm", "rms_norm", "embedding", "embedding_bag", "multihead_attention", "addmm",
                       "bilinear"}
    assert library["batch_norm"].weights and library["group_norm"].weights   # weights, yet they follow
    assert library["prelu"].weights and library["instance_norm"].weights


class Scale(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features, dtype=torch.float64))

    def forward(self, x):
        return x * self.weight


class Shift(Scale):
    def forward(self, x):
        return x + self.weight


def scale(input, weight):
    return input * weight


def shift(input, offset):
    return input + offset


def _declare(name, apply, module, role, rule):
    op = declare_op(name, apply, modules={module: lambda m: {role: m.weight}}, replace=True)
    register_rule(op, conditions="T", replace=True)(rule)
    return op


def _scale_back(ctx, g):
    return {"input": g * ctx.param("weight")}


def _shift_back(ctx, g):
    return {"input": g}


def test_a_user_op_with_a_weight_argument_starts_a_unit_without_a_flag():
    x = torch.randn(3, 4, dtype=torch.float64)
    scale_op = _declare("test_rule_library_scale", scale, Scale, "weight", _scale_back)
    shift_op = _declare("test_rule_library_shift", shift, Shift, "offset", _shift_back)
    assert starts_unit(scale_op) and not starts_unit(shift_op)
    model = nn.Sequential(nn.Tanh(), Scale(4), nn.Tanh(), Shift(4), nn.Tanh()).double()
    program = fbcompile.compile(model, x)
    sizes = [len(unit.nodes) for unit in program.units]
    assert sizes == [1, 4], sizes   # tanh | scale (starts a unit), tanh, shift (joins), tanh
