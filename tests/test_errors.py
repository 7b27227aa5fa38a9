"""Every error path raises an FBCompileError subclass whose message names what went wrong: the node,
the op, the user code line, the rule, the option."""
import re

import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import OptionError, RuleError, UnsupportedOpError, UntraceableModelError
from fbcompile.ops import declare_op
from fbcompile.registry import register_rule


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:     # data-dependent control flow
            return torch.tanh(h)
        return h


def test_untraceable_model_carries_fx_reason_line_and_hint():
    with pytest.raises(UntraceableModelError) as caught:
        fbcompile.compile(Branchy(), torch.randn(2, 3))
    message = str(caught.value)
    assert "Branchy" in message
    assert "symbolically traced variables cannot be used as inputs to control flow" in message   # fx's reason
    assert "test_errors.py" in message and "if h.sum() > 0" in message        # where, with the code
    assert "hint:" in message
    # torch.export's refusal keeps the line of forward it names after its help text (it was cut before)
    assert "- torch.export: torch.export could not capture Branchy" in message
    assert re.search(r'test_errors\.py", line \d+, in forward\n\s+if h\.sum\(\) > 0:', message)
    assert isinstance(caught.value, fbcompile.FBCompileError)
    with pytest.raises(UntraceableModelError):
        fbcompile.coverage(Branchy(), torch.randn(2, 3))


class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        c = torch.igamma(h.abs(), 2.0 + h)
        p = torch.special.bessel_j0(h + c)
        s = torch.special.ndtri(torch.sigmoid(p))
        return s.sum(1)


def test_unsupported_ops_listed_all_at_once_with_lines():
    model, x = ManyUnsupported(), torch.randn(2, 4)
    with pytest.raises(UnsupportedOpError) as caught:
        fbcompile.compile(model, x)
    error = caught.value
    assert [p.node for p in error.nodes] == ["igamma", "special_bessel_j0", "special_ndtri"]
    message = str(error)
    assert "3 node(s) of ManyUnsupported" in message
    for node, op, code in (("igamma", "torch.igamma", "c = torch.igamma(h.abs(), 2.0 + h)"),
                           ("special_bessel_j0", "special_bessel_j0", "p = torch.special.bessel_j0(h + c)"),
                           ("special_ndtri", "special_ndtri", "torch.special.ndtri(torch.sigmoid(p))")):
        line = next(ln for ln in message.splitlines() if ln.strip().startswith(f"{node} = "))
        assert op in line, line
        assert code in message
    assert "no op is declared" in message and "register_rule" in message
    assert fbcompile.coverage(model, x) == error.nodes
    assert all("test_errors.py" in p.line for p in error.nodes)


def test_coverage_is_empty_for_a_supported_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))
    assert fbcompile.coverage(model, torch.randn(2, 1, 8, 8)) == []


def test_unknown_condition_names_the_choices():
    for call in (fbcompile.compile, fbcompile.coverage):
        with pytest.raises(OptionError) as caught:
            call(nn.Linear(2, 2), torch.randn(1, 2), condition="Q")
        assert "'Q'" in str(caught.value) and "'I', 'P' or 'T'" in str(caught.value)


def _fresh_op(name):
    return declare_op(name, lambda input: input * 2.0, replace=True)


def test_registering_a_rule_twice_raises_unless_replace():
    op = _fresh_op("test_errors_double")

    @register_rule(op, conditions="T", replace=True)
    def first(ctx, g):
        return {"input": 2.0 * g}

    with pytest.raises(RuleError) as caught:
        @register_rule(op, conditions="T")
        def second(ctx, g):
            return {"input": 2.0 * g}
    message = str(caught.value)
    assert "'test_errors_double'" in message and "test_errors_double.first" in message and "replace=True" in message

    @register_rule(op, conditions="T", replace=True)
    def third(ctx, g):
        return {"input": 2.0 * g}


def test_declaring_an_op_twice_or_bad_rule_options_raise():
    _fresh_op("test_errors_declared")
    with pytest.raises(RuleError, match="'test_errors_declared' is already declared"):
        declare_op("test_errors_declared", lambda input: input)
    with pytest.raises(RuleError, match="conditions must be drawn from"):
        register_rule("test_errors_declared", conditions="X")
    with pytest.raises(RuleError, match="kind must be"):
        register_rule("test_errors_declared", kind="approximately")


class Doubler(nn.Module):
    def forward(self, x):
        return x * 2.0


def _model_with_rule(name, rule):
    """A model whose one node is a freshly declared op ``name`` with ``rule`` as its T rule."""
    declare_op(name, lambda input: input * 2.0, modules={Doubler: lambda m: {}}, replace=True)
    register_rule(name, conditions="T", replace=True, name=f"{name}.broken")(rule)
    return nn.Sequential(nn.Linear(3, 3), Doubler())


def test_rule_returning_a_non_dict_names_rule_node_and_op():
    model = _model_with_rule("test_errors_nondict", lambda ctx, g: 2.0 * g)
    with pytest.raises(RuleError) as caught:
        fbcompile.compile(model, torch.randn(2, 3))
    message = str(caught.value)
    assert "test_errors_nondict.broken" in message and "Proxy" in message and "_1" in message and "dict" in message


def test_rule_missing_an_argument_names_rule_node_and_argument():
    model = _model_with_rule("test_errors_missing", lambda ctx, g: {"other": g})
    with pytest.raises(RuleError) as caught:
        fbcompile.compile(model, torch.randn(2, 3))
    message = str(caught.value)
    assert "test_errors_missing.broken" in message and "'input'" in message and "_1" in message


def test_wrong_output_error_shape_names_the_output_node():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    with pytest.raises(fbcompile.FBCompileError) as caught:
        program.propagate_error(x, torch.randn(4, 3, dtype=torch.float64))
    message = str(caught.value)
    assert "'_0'" in message and "(4, 3)" in message and "(4, 2)" in message
    with pytest.raises(fbcompile.FBCompileError, match="1 tensor"):
        program.propagate_error(x, (torch.randn(4, 2, dtype=torch.float64),) * 2)


def test_wrong_number_of_example_inputs():
    with pytest.raises(fbcompile.FBCompileError, match=r"takes 1 input\(s\) \(input_1\) but 2"):
        fbcompile.compile(nn.Linear(2, 2), (torch.randn(1, 2), torch.randn(1, 2)))


def test_failing_example_run_names_the_node_and_line():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(fbcompile.FBCompileError) as caught:
        fbcompile.compile(Bad(), torch.randn(2, 3))
    message = str(caught.value)
    assert "fc" in message and "return self.fc(x)" in message and "mat1 and mat2" in message


def test_unsupported_hyperparameters_are_reported_per_node():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.InstanceNorm1d(1, track_running_stats=True)
            self.embed = nn.Embedding(8, 8, max_norm=1.0)

        def forward(self, x):
            return self.embed(x.argmax(-1)) + self.norm(x)

    problems = fbcompile.coverage(Model(), torch.randn(2, 1, 8))
    assert [(p.node, p.canonical) for p in problems] == [("embed", "embedding"), ("norm", "instance_norm")]
    assert "max_norm" in problems[0].reason and "track_running_stats=True" in problems[1].reason


def test_unknown_rule_variant_is_refused_with_the_registered_ones():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(fbcompile.FBCompileError, match=r"unknown rule variant\(s\) 'exakt'.*exact-statistics"):
        fbcompile.compile(model, torch.randn(2, 3), variants=("exakt",))
