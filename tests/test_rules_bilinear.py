"""Products of activations and embeddings (float64): mul/div of two active values with broadcasting,
matmul/mm/bmm/@ with batch broadcasting and 1-D operands, einsum (explicit, implicit, ellipsis,
broadcast letters, letters summed inside one operand), nn.Embedding / F.embedding. Each against
autograd (inputs and parameters) and the adjoint identity per node; refusals and declared kinds."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.context import RuleContext
from fbcompile.errors import FBCompileError
from fbcompile.trace import info
from fbcompile.verify.checks import adjoint_check, autograd_gradients, relative_error, rule_errors

from helpers import grads_of

TOL = 1e-10


class Two(nn.Module):
    """fn(tanh(a), sigmoid(b) + 0.5): two active operands, the second bounded away from zero."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(torch.tanh(a), torch.sigmoid(b) + 0.5)


class Three(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b, c):
        return self.fn(torch.tanh(a), 2 * torch.tanh(b), torch.sigmoid(c))


def assert_exact(model, inputs, **compile_options):
    """Every node's TJML and adjoint gap ~0, and error mode == autograd for every input and parameter."""
    program = fbcompile.compile(model, inputs, **compile_options)
    if all(info(node).from_input for node in program.rules):
        for name, (tjml_rel, gap) in rule_errors(program, inputs).items():
            assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    else:   # verify() does not measure parameter-path nodes (no active input): adjoint identity per node
        for node in program.rules:
            if info(node).from_input:
                assert adjoint_check(program, node.name, inputs) < TOL, node.name
    out = model(*inputs)
    error = torch.randn_like(out)
    ref_inputs, ref_params = autograd_gradients(model, inputs, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(inputs, error)
    ours = ours if isinstance(ours, tuple) else (ours,)
    for mine, ref in zip(ours, ref_inputs, strict=True):
        assert relative_error(mine, ref) < TOL
    mine = grads_of(model)
    for name, ref in ref_params.items():
        assert ref is not None and relative_error(mine[name], ref) < TOL, name
    return program


def _randn(shape):
    return torch.randn(*shape, dtype=torch.float64)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast together: a common shape with leading dims dropped and dims set to 1."""
    full = draw(st.lists(st.integers(2, 4), min_size=1, max_size=3))

    def operand():
        drop = draw(st.integers(0, len(full) - 1))
        return [1 if draw(st.booleans()) else s for s in full[drop:]]

    return operand(), operand()


@settings(max_examples=25, deadline=None)
@given(broadcast_pair(), st.sampled_from(["mul", "div", "rdiv", "mul_method", "torch_mul", "square"]))
def test_mul_div_of_two_activations_is_exact(shapes, spelling):
    fn = {"mul": lambda x, y: x * y, "div": lambda x, y: x / y, "rdiv": lambda x, y: (x + 2) / (y * x + 3),
          "mul_method": lambda x, y: x.mul(y), "torch_mul": lambda x, y: torch.mul(y, x),
          "square": lambda x, y: torch.div(x * x, y)}[spelling]
    assert_exact(Two(fn).double(), (_randn(shapes[0]), _randn(shapes[1])), units="op")


@st.composite
def matmul_shapes(draw):
    """Operand shapes for torch.matmul: batch dims broadcast (dropped or set to 1), 1-D operands."""
    m, k, n = (draw(st.integers(1, 4)) for _ in range(3))
    batch = draw(st.lists(st.integers(2, 3), max_size=2))

    def batch_of():
        kept = batch[draw(st.integers(0, len(batch))):]
        return [1 if draw(st.booleans()) else s for s in kept]

    a = [k] if draw(st.booleans()) else batch_of() + [m, k]
    b = [k] if draw(st.booleans()) else batch_of() + [k, n]
    return a, b


@settings(max_examples=30, deadline=None)
@given(matmul_shapes(), st.sampled_from(["@", "matmul", "method"]))
def test_matmul_of_two_activations_is_exact(shapes, spelling):
    fn = {"@": lambda x, y: x @ y, "matmul": torch.matmul, "method": lambda x, y: x.matmul(y)}[spelling]
    assert_exact(Two(fn).double(), (_randn(shapes[0]), _randn(shapes[1])), units="op")


def test_mm_bmm_and_attention_scores_are_exact():
    def fn(q, k, v):
        mixed = torch.bmm(torch.tanh(torch.bmm(q, k.transpose(1, 2))), v).sum(-1).flatten()
        return mixed + torch.mm(q.flatten(0, 1), k.flatten(0, 1).transpose(0, 1)).sum(1)

    assert_exact(Three(fn).double(), (_randn((2, 3, 4)), _randn((2, 5, 4)), _randn((2, 5, 3))))


class WithParameter(nn.Module):
    """An activation times parameters: direct (x @ W, torch.mm(x, W)) and through a computed value
    (W transposed, an einsum operand)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.u = nn.Parameter(torch.randn(3, 4))
        self.gamma = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        h = torch.tanh(x @ self.w) + torch.mm(x, self.u.transpose(0, 1)) * 0.5
        h = self.gamma * h / (1.0 + self.gamma)
        return torch.einsum("bj,jk->bk", h, self.u) + torch.einsum("bj,kj->bk", h, self.w)


def test_products_with_parameters_give_exact_weight_gradients():
    program = assert_exact(WithParameter().double(), (_randn((5, 4)),))
    assert {"w", "u", "gamma"} <= set(program.feedback["error"].params)


LETTERS = "abcd"


@st.composite
def einsum_case(draw):
    """A random explicit einsum: 1-3 operands, each a permutation of a subset of the letters (no
    repeats within one), some letters size 1 in one operand (broadcast), any output subset."""
    sizes = {c: draw(st.integers(2, 3)) for c in LETTERS}
    count = draw(st.integers(1, 3))
    subscripts = [draw(st.permutations(LETTERS).map(lambda p, n=draw(st.integers(1, 3)): "".join(p[:n])))
                  for _ in range(count)]
    used = sorted(set("".join(subscripts)))
    out = "".join(draw(st.permutations(used))[:draw(st.integers(0, len(used)))])
    shapes = [[1 if draw(st.integers(0, 5)) == 0 else sizes[c] for c in s] for s in subscripts]
    return ",".join(subscripts) + "->" + out, shapes


class OneEinsum(nn.Module):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation

    def forward(self, x):
        return torch.einsum(self.equation, torch.tanh(x))


def _einsum_model(equation, count):
    if count == 1:
        return OneEinsum(equation).double()
    fn = lambda *xs: torch.einsum(equation, *xs)   # noqa: E731
    return (Two(fn) if count == 2 else Three(fn)).double()


@settings(max_examples=30, deadline=None)
@given(einsum_case())
def test_einsum_is_exact(case):
    equation, shapes = case
    assert_exact(_einsum_model(equation, len(shapes)), tuple(_randn(s) for s in shapes), units="op")


@pytest.mark.parametrize("equation,shapes", [
    ("bij,bjk", [(2, 3, 4), (2, 4, 2)]),            # implicit output
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (3, 4, 2)]),
    ("b...d,b...d->b...", [(2, 3, 4), (2, 3, 4)]),
    ("bhld,bhsd->bhls", [(2, 2, 3, 4), (2, 2, 5, 4)]),
    ("ij,j->i", [(3, 4), (4,)]),
    ("ij,kl->ijkl", [(2, 3), (1, 2)]),
    ("bij,bij->", [(2, 3, 1), (2, 3, 4)]),
])
def test_einsum_spellings_are_exact(equation, shapes):
    assert_exact(_einsum_model(equation, 2), tuple(_randn(s) for s in shapes), units="op")


def test_einsum_with_its_operands_in_a_list_is_exact():
    """torch.einsum(eq, [a, b]) traces as einsum(eq, a, b)."""
    assert_exact(Two(lambda x, y: torch.einsum("bi,bj->bij", [x, y])).double(), (_randn((3, 2)), _randn((3, 4))))


def _kinds(program):
    return {node.name: rule.kind_for(RuleContext(node)) for node, rule in program.rules.items()}


def test_kinds_are_declared_honestly():
    """A product of two input-dependent factors is "linearised"; a factor that is a parameter, a
    parameter path or a constant keeps the rule "exact"."""
    program = fbcompile.compile(Two(lambda x, y: (x * y) @ (y / x).transpose(0, 1) + x * 2.0).double(),
                                (_randn((4, 4)), _randn((4, 4))))
    kinds = _kinds(program)
    assert kinds["mul"] == kinds["truediv"] == kinds["matmul"] == "linearised"
    assert kinds["mul_1"] == "exact"
    kinds = _kinds(fbcompile.compile(WithParameter().double(), (_randn((5, 4)),)))
    assert {kinds[n] for n in ("matmul", "mm", "mul", "truediv", "einsum", "einsum_1")} == {"exact"}


class BareProducts(nn.Module):
    """Products of the inputs and nothing else (no activation with a non-linear target map)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(16, 3))

    def forward(self, x, y):
        outer = torch.einsum("bi,bj->bij", x, y).flatten(1) @ self.mix
        return outer + (x * y / (y * y + 1)).sum(1, keepdim=True) + torch.bmm(x.unsqueeze(1), y.unsqueeze(2))[:, 0]


def test_difference_mode_equals_error_mode_through_products():
    """The products' feedback is linear in g, so difference correction (DTP) maps an output
    difference exactly as the error map does: DTP's small-beta limit is backpropagation."""
    inputs = (_randn((5, 4)), _randn((5, 4)))
    program = fbcompile.compile(BareProducts().double(), inputs)
    run = program.executable("error", "difference")
    with torch.no_grad():
        output, taps = run.run_forward(inputs)
        difference = 1e-3 * torch.randn_like(output)
        by_error, _ = run.run_feedback("error", (difference,), taps)
        by_difference, _ = run.run_feedback("difference", (difference,), taps)
    assert by_error[0] is not None and by_error[1] is not None      # the two inputs, then unit outputs
    for a, b in zip(by_error, by_difference, strict=True):
        assert relative_error(b, a) < TOL


@pytest.mark.parametrize("condition", ["P", "I"])
def test_products_of_activations_are_refused_under_p_and_i(condition):
    model = Two(lambda x, y: x * y).double()
    with pytest.raises(FBCompileError, match=r"condition P/I of mul of two activations"):
        fbcompile.compile(model, (_randn((3, 4)), _randn((3, 4))), condition=condition)


@pytest.mark.parametrize("fn,match", [
    (lambda x, y: torch.div(x, y, rounding_mode="floor"), "rounding_mode='floor'"),
])
def test_unsupported_products_are_refused_with_a_reason(fn, match):
    with pytest.raises(FBCompileError, match=match):
        fbcompile.compile(Two(fn).double(), (_randn((3, 3)), _randn((3, 3))))


@pytest.mark.parametrize("equation", ["bii->bi", "bii->b", "bij,bjj->bi", "bii,bik->bk"])
def test_einsum_repeating_a_letter_takes_autograds_vjp(equation):
    """A diagonal or trace within one operand has no transposed einsum; autograd's vjp is exact."""
    operands = [_randn((3, 4, 4)) for _ in range(equation.count(",") + 1)]
    assert_exact(_einsum_model(equation, len(operands)), tuple(operands), units="op")


# -- embedding ------------------------------------------------------------------------------------

class TokenModel(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.embed = nn.Embedding(7, 4, **options)
        self.table = nn.Parameter(torch.randn(7, 3))
        self.fc = nn.Linear(10, 2)

    def forward(self, ids):
        h = torch.cat([self.embed(ids), F.embedding(ids, self.table), F.embedding(ids, self.table * 0.5)], -1)
        return self.fc(torch.tanh(h).mean(1))


def assert_token_model_exact(model, ids):
    """Error mode == autograd for every parameter (the integer ids get no error)."""
    program = fbcompile.compile(model, ids)
    out = model(ids)
    error = torch.randn_like(out)
    reference = dict(zip([n for n, _ in model.named_parameters()],
                         torch.autograd.grad((model(ids) * error).sum(), list(model.parameters()))))
    model.zero_grad(set_to_none=True)
    program.propagate_error(ids, error)
    for name, grad in grads_of(model).items():
        assert relative_error(grad, reference[name]) < TOL, name
    return program


@pytest.mark.parametrize("options", [{}, {"padding_idx": 2}, {"padding_idx": -1}, {"scale_grad_by_freq": True}])
def test_embedding_weight_gradient_is_exact(options):
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (4, 6))
    ids[0, :3] = torch.tensor([2, 6, 2])          # repeats, the padding rows
    model = TokenModel(**options).double()
    assert_token_model_exact(model, ids)
    if "padding_idx" in options:
        assert bool((model.embed.weight.grad[options["padding_idx"]] == 0).all())


@pytest.mark.parametrize("options,match", [({"max_norm": 1.0}, "max_norm"), ({"sparse": True}, "sparse")])
def test_embedding_options_that_are_not_supported_are_refused(options, match):
    with pytest.raises(FBCompileError, match=match):
        fbcompile.compile(TokenModel(**options).double(), torch.randint(0, 7, (2, 3)))
