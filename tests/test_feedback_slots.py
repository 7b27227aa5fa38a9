"""Which weights fixed random or learned feedback stands in for (FeedbackWeights' slots).

FA replaces every weight that maps activations to activations by its fixed random B. A parameter
multiplied by matmul (``h @ self.W``) fed back through the true W before, and an einsum, an
autograd-differentiated product (tensordot, addmv, ...) whose operand is a parameter still does: FA's update
was part backprop, silently. Now matmul's parameter operand has a slot, and a program with any
other such weight is refused by the learners with feedback weights, naming the node."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import OptionError
from fbcompile.verify.checks import rule_errors
from helpers import compare_with_autograd, randomise_vectors


class ProductModel(nn.Module):
    """h = tanh(lin(x)), then a parameter W applied to h by ``product``, then a linear head."""

    def __init__(self, product):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.W, self.head = nn.Linear(6, 5), nn.Parameter(torch.randn(5, 4)), nn.Linear(4, 3)
        self.product = product

    def forward(self, x):
        return self.head(torch.tanh(self.product(torch.tanh(self.lin(x)), self.W)))


def _matmul(h, w):
    return h @ w


def fa_step_by_hand(product, options=None):
    """One FA step on ``ProductModel(product)`` in float64 and the same step by hand: e at the output,
    then B in place of every slotted weight on the way down (W's own value where W has no slot).
    Returns (model, feedback weights by qualified name, hand-made W grad, lin grad, d2, h1, x)."""
    model = ProductModel(product).double()
    x, target = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(model, x), "fa", **(options or {}))
    feedback = {learner.feedback.qualnames[key]: b for key, b in learner.feedback.mapping().items()}
    model.zero_grad(set_to_none=True)
    learner.step(x, target, F.mse_loss)
    h1 = torch.tanh(model.lin(x))
    h2 = torch.tanh(h1 @ model.W)
    e = 2 * (model.head(h2) - target) / target.numel()
    d2 = (e @ feedback["head.weight"]) * (1 - h2 ** 2)
    d1 = (d2 @ feedback.get("W", model.W.detach()).t()) * (1 - h1 ** 2)
    return model, feedback, h1.t() @ d2, d1.t() @ x, d2, h1, x


def test_fa_feeds_back_through_a_random_matrix_in_place_of_a_matmul_parameter():
    model, feedback, w_grad, lin_grad, d2, h1, x = fa_step_by_hand(_matmul)
    assert set(feedback) == {"lin.weight", "W", "head.weight"}
    assert torch.allclose(model.W.grad, w_grad, rtol=1e-12, atol=1e-14)
    assert torch.allclose(model.lin.weight.grad, lin_grad, rtol=1e-12, atol=1e-14)
    true_d1 = (d2 @ model.W.detach().t()) * (1 - h1 ** 2)
    assert not torch.allclose(model.lin.weight.grad, true_d1.t() @ x, rtol=1e-3)


PRODUCTS = {
    "einsum": lambda h, w: torch.einsum("bi,ij->bj", h, w),
    "tensordot": lambda h, w: torch.tensordot(h, w, dims=1),
    "computed weight": lambda h, w: h @ (2 * w),
    "addmv rows": lambda h, w: torch.stack([torch.addmv(torch.zeros(4, dtype=h.dtype), w.t(), r) for r in h.unbind(0)]),
}


@pytest.mark.parametrize("product", sorted(PRODUCTS))
@pytest.mark.parametrize("algorithm", ["fa", "dtp-random"])
def test_a_parameter_weight_without_a_slot_is_refused_by_feedback_weight_learners(product, algorithm):
    model = ProductModel(PRODUCTS[product])
    x = torch.randn(4, 6)
    program = fbcompile.compile(model, x)
    name, options = ("dtp", {"feedback": "random"}) if algorithm == "dtp-random" else (algorithm, {})
    with pytest.raises(OptionError, match="no feedback slot"):
        fbcompile.learner(program, name, **options)
    result = fbcompile.learner(program, "bp").step(x, torch.randint(0, 3, (4,)), F.cross_entropy)
    assert result.loss > 0                      # the forward weights' learners are unaffected


def test_opting_in_feeds_back_through_the_forward_value_of_a_weight_without_a_slot():
    model, feedback, w_grad, lin_grad, *_ = fa_step_by_hand(PRODUCTS["einsum"], {"unslotted": "forward"})
    assert set(feedback) == {"lin.weight", "head.weight"}          # W has no slot: its own value
    assert torch.allclose(model.W.grad, w_grad, rtol=1e-12, atol=1e-14)
    assert torch.allclose(model.lin.weight.grad, lin_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("product", ["matmul", *sorted(PRODUCTS)])
def test_error_mode_through_each_product_equals_autograd_with_adjoint_rules(product):
    """float64, every parameter autograd reaches (W, lin, head; none left at zero), and each
    node's TJML and adjoint gap with random vectors."""
    torch.manual_seed(5)
    model = randomise_vectors(ProductModel(_matmul if product == "matmul" else PRODUCTS[product]).double())
    x = torch.randn(5, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert max(compare_with_autograd(model, x, program=program)) < 1e-12
    assert {"W", "lin.weight", "head.weight"} <= set(program.feedback["error"].params)
    for name, (tjml, gap) in rule_errors(program, (x,)).items():
        assert tjml < 1e-10 and gap < 1e-10, (name, tjml, gap)
