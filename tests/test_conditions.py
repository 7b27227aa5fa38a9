"""Conditions P and I (float64): P rules' feedback Jacobians equal torch.linalg.pinv of the forward
Jacobian, I rules' equal the inverse, the I target map inverts an invertible network, and every
refusal names the node and the op."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import jacrev

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.errors import ConditionError, UnsupportedOpError
from fbcompile.rules import dense
from fbcompile.verify.evaluate import forward_values, node_problem

REL = 1e-8


def jacobians(program, node_name, x):
    """Dense (J_F, J_G) of one node over the whole batch, all active inputs/outputs flattened."""
    node = next(n for n in program.rules if n.name == node_name)
    problem = node_problem(program, node, forward_values(program, (x,)))
    flat = lambda parts: torch.cat([p.reshape(-1) for p in parts])
    sizes = [t.numel() for t in problem.inputs]

    def f(v):
        return flat(problem.forward(*[c.reshape(t.shape) for c, t in zip(v.split(sizes), problem.inputs)]))

    outputs = problem.forward(*problem.inputs)

    def g(w):
        pieces = w.split([o.numel() for o in outputs])
        return flat(problem.feedback(*[p.reshape(o.shape) for p, o in zip(pieces, outputs)]))

    j_f = jacrev(f)(flat(problem.inputs))
    j_g = jacrev(g)(torch.zeros(sum(o.numel() for o in outputs), dtype=x.dtype))
    return j_f, j_g


def rel(a, b):
    return float(torch.linalg.norm(a - b).detach() / torch.linalg.norm(b).detach())


def assert_condition(model, x, condition, nodes=None):
    program = fbcompile.compile(model.double(), x, condition=condition)
    for node in program.rules:
        if nodes is not None and node.name not in nodes:
            continue
        j_f, j_g = jacobians(program, node.name, x)
        target = torch.linalg.pinv(j_f) if condition == "P" else torch.linalg.inv(j_f)
        assert rel(j_g, target) < REL, (node.name, program.rules[node].name, rel(j_g, target))
    return program


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.booleans())
def test_linear_pinv(n_in, n_out, bias, leading):
    x = torch.randn(*((2, 3) if leading else (3,)), n_in, dtype=torch.float64)
    assert_condition(nn.Sequential(nn.Linear(n_in, n_out, bias=bias)), x, "P")


ACTIVATIONS = [nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1), nn.ELU(0.8), nn.Softplus(1.5), nn.ReLU(), nn.GELU(),
               nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardtanh(-0.5, 0.5)]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_activation_pinv(act):
    """Elementwise (pseudo-)inverse: 1/sigma'(x), 0 where sigma'(x) = 0 (relu, saturated hardtanh)."""
    assert_condition(nn.Sequential(act), 2 * torch.randn(3, 4, dtype=torch.float64), "P")


STRUCTURAL = {
    "flatten": lambda x: x.flatten(1), "view": lambda x: x.view(3, 2, 12), "transpose": lambda x: x.transpose(1, 2),
    "permute": lambda x: x.permute(2, 0, 3, 1), "unsqueeze": lambda x: x.unsqueeze(1),
    "cat": lambda x: torch.cat([torch.tanh(x), torch.sigmoid(x)], 2),
    "split": lambda x: torch.split(x, [1, 2], 2)[0] * 2 + torch.split(x, [1, 2], 2)[1][:, :, :1],
    "chunk": lambda x: x.chunk(2, 1)[1] * 3.0, "index": lambda x: x[:, 1:3, ::2],
    "add": lambda x: torch.add(torch.tanh(x), torch.sigmoid(x), alpha=2.0), "sub": lambda x: x - 1.5,
    "mul": lambda x: x * 2.5, "div": lambda x: x / -4.0, "neg": lambda x: -x,
    "mean": lambda x: x.mean((1, 3)), "sum": lambda x: x.sum(-1, keepdim=True),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_and_arithmetic_pinv(name):
    assert_condition(Fn(STRUCTURAL[name]), torch.randn(3, 2, 3, 4, dtype=torch.float64), "P")


BROADCAST = {
    "add_row": lambda x: torch.tanh(x) + torch.sigmoid(x).sum(0),
    "sub_keepdim_alpha": lambda x: torch.sub(torch.tanh(x).sum(2, keepdim=True), torch.sigmoid(x), alpha=2.0),
    "add_constant_to_broadcast": lambda x: x.sum(0) + torch.ones(2, 3, 4, dtype=x.dtype),
    "mul_broadcast_by_constant": lambda x: torch.tanh(x).sum(0) * (torch.arange(6.0, dtype=x.dtype).reshape(2, 3, 1) - 2),
    "mul_by_broadcast_constant": lambda x: torch.tanh(x) * torch.linspace(-1, 1, 4, dtype=x.dtype),
    "div_broadcast": lambda x: torch.tanh(x).sum(0) / (torch.rand(2, 3, 1, dtype=x.dtype) + 0.5),
}


@pytest.mark.parametrize("name", sorted(BROADCAST))
def test_broadcasting_add_and_scale_pinv(name):
    """Broadcasting makes J = [S_x, a S_y] or diag(c) S: the Woodbury / normal-equation forms."""
    assert_condition(Fn(BROADCAST[name]), torch.randn(2, 3, 4, dtype=torch.float64), "P")


def test_broadcast_operands_refused_where_no_formula_or_inverse_exists():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert "both broadcast" in _refusal(Fn(lambda x: x.sum(1, keepdim=True) + x.sum(2, keepdim=True)), x, "P")
    assert "broadcast operand" in _refusal(Fn(lambda x: x.unsqueeze(0) * torch.ones(3, 1, 1, 1, dtype=x.dtype)), x)
    assert "broadcast operand" in _refusal(Fn(lambda x: x.unsqueeze(0) + torch.ones(3, 1, 1, 1, dtype=x.dtype)), x)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([1, 2]), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans())
def test_max_pool_pinv_is_diag_inverse_counts_times_transpose(n, kernel, stride, padding, ceil):
    """J^+ = diag(1/c) J^T with c the number of windows choosing each input (overlap: c > 1)."""
    padding = min(padding, kernel // 2)
    pool = (nn.MaxPool1d if n == 1 else nn.MaxPool2d)(kernel, stride, padding, ceil_mode=ceil)
    x = torch.randn(2, 2, *(5,) * n, dtype=torch.float64)
    assert_condition(nn.Sequential(pool), x, "P")


@pytest.mark.parametrize("pool,shape", [
    (nn.AvgPool1d(3, 2, 1), (2, 2, 7)), (nn.AvgPool2d(2, 1), (2, 2, 4, 4)),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, 1, 5, 5)),
    (nn.AdaptiveAvgPool1d(3), (2, 2, 5)), (nn.AdaptiveAvgPool2d((3, 2)), (2, 2, 5, 4)),
    (nn.AdaptiveAvgPool2d(1), (2, 3, 4, 4)), (nn.AdaptiveAvgPool1d(1), (2, 3, 6))], ids=repr)
def test_pooling_pinv_via_dense_operator(pool, shape):
    assert_condition(nn.Sequential(pool), torch.randn(*shape, dtype=torch.float64), "P")


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 4, 4)), (nn.Conv2d(2, 4, (2, 3), stride=2, groups=2), (2, 2, 5, 6)),
    (nn.Conv1d(3, 2, 3, dilation=2, padding="same"), (2, 3, 7)), (nn.Conv1d(1, 4, 2, stride=3), (2, 1, 9))], ids=repr)
def test_conv_pinv_via_dense_operator(conv, shape):
    assert_condition(nn.Sequential(conv), torch.randn(*shape, dtype=torch.float64), "P")


def test_dropout_pinv_and_train_mask():
    model = nn.Sequential(nn.Tanh(), nn.Dropout(0.5)).train()
    assert_condition(model, torch.randn(4, 5, dtype=torch.float64), "P")


# -- condition I ----------------------------------------------------------------------------------
INVERTIBLE = [nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.2), nn.ELU(1.3), nn.Softplus(2.0)]


@pytest.mark.parametrize("act", INVERTIBLE, ids=repr)
def test_inverse_of_square_linear_and_invertible_activations(act):
    assert_condition(nn.Sequential(nn.Linear(4, 4), act), torch.randn(3, 4, dtype=torch.float64), "I")


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(2, 2, 1)), nn.Sequential(nn.Conv2d(2, 2, (3, 1), padding=(1, 0))),
    nn.Sequential(nn.AdaptiveAvgPool2d((3, 3))), Fn(lambda x: x.transpose(2, 3).flatten(1) / 3.0)], ids=repr)
def test_inverse_of_square_conv_pool_and_structural(model):
    assert_condition(model, torch.randn(2, 2, 3, 3, dtype=torch.float64), "I")


def _eager_target_chain(program, x):
    """G(F(x)): every rule's target map, eagerly, from the output back to the input."""
    values = forward_values(program, (x,))
    t = program.model(x)
    for node in reversed(list(program.rules)):
        ctx = EagerContext(node, values, program.model)
        t = program.rules[node].target_map()(ctx, t)["input"]
    return t


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.3), nn.Tanh(), nn.ELU(0.5), nn.Sigmoid(), nn.Softplus()], ids=repr)
def test_inverse_target_map_inverts_an_invertible_network(act):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 5), act, nn.Linear(5, 5), nn.LeakyReLU(0.5), nn.Linear(5, 5)).double()
    x = 0.5 * torch.randn(4, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x, condition="I")
    assert torch.allclose(_eager_target_chain(program, x), x, rtol=1e-9, atol=1e-10)
    run = program.executable("target")
    output, taps = run.run_forward((x,))
    values, _ = run.run_feedback("target", (output,), taps)
    assert torch.allclose(values[0], x, rtol=1e-9, atol=1e-10)


def test_pinv_target_inverts_an_injective_linear():
    """A tall Linear has full column rank: W^+ (W x + b - b) = x."""
    model = nn.Sequential(nn.Linear(3, 7)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x, condition="P")
    assert torch.allclose(_eager_target_chain(program, x), x, rtol=1e-10, atol=1e-12)


def _refusal(model, x, condition="I"):
    with pytest.raises(UnsupportedOpError) as caught:
        fbcompile.compile(model.double(), x, condition=condition)
    assert len(caught.value.nodes) == 1
    return str(caught.value)


def test_non_square_linear_refused_naming_node_and_op():
    message = _refusal(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(2, 4, dtype=torch.float64))
    assert "_2" in message and "'linear'" in message and "square" in message and "4 -> 3" in message


def test_relu_refused_under_condition_i():
    message = _refusal(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4, dtype=torch.float64))
    assert "_1" in message and "relu" in message and "not invertible" in message


def test_conv_above_the_dense_limit_refused_naming_size():
    x = torch.randn(1, 4, 32, 32, dtype=torch.float64)
    for condition in "PI":
        message = _refusal(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)), x, condition)
        assert "_0" in message and "conv2d" in message and "4096 x 4096" in message
        assert "set_dense_limit" in message and f"{dense.DENSE_LIMIT:,}" in message


def test_dense_limit_can_be_raised():
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    old = dense.DENSE_LIMIT
    try:
        dense.set_dense_limit(100)
        assert "100" in _refusal(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)), x, "P")
        dense.set_dense_limit(36 * 36)
        program = fbcompile.compile(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)).double(), x, condition="P")
        assert program.condition == "P" and {r["kind"] for r in fbcompile.verify(program, x).rows} == {"exact"}
    finally:
        dense.set_dense_limit(old)


def test_singular_linear_raises_condition_error_naming_node_and_op():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    with torch.no_grad():
        model[0].weight[2] = model[0].weight[0] + model[0].weight[1]   # rank 2
        model[0].weight[2, 0] += 0.0
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]]))
    program = fbcompile.compile(model, x, condition="I")
    with pytest.raises(ConditionError) as caught:
        program.propagate_error(x, torch.randn(2, 3, dtype=torch.float64))
    assert "'_0'" in str(caught.value) and "Linear" in str(caught.value) and "singular" in str(caught.value)


def test_condition_i_of_max_pool_and_lossy_ops_refused():
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert "max_pool2d" in _refusal(nn.Sequential(nn.MaxPool2d(2)), x)
    assert "mean" in _refusal(Fn(lambda x: x.mean(1)), x)
    assert "_0" in _refusal(nn.Sequential(nn.AvgPool2d(2)), x)


def test_singular_dense_operator_raises_condition_error_naming_node_and_op():
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 4.0]]).reshape(2, 2, 1, 1))
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x, condition="I")
    with pytest.raises(ConditionError, match="conv2d node '_0' is singular"):
        program.propagate_error(x, torch.randn(2, 2, 3, 3, dtype=torch.float64))
