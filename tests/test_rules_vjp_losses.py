"""Losses computed inside the forward (rules/vjp_losses.py), in float64 through both front ends: every
rule's TJML residual and adjoint gap, input and parameter gradients equal to autograd's (a target
computed from activations gets its share, integer targets none), the nn modules, and a model that
returns its own loss trained by every error-propagation learner."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile

from helpers import randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = torch.tensor([0, 3, 1, 7, 2])
SIGNS = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
CASES = {
    "mse_loss": lambda m, h: F.mse_loss(h, torch.tanh(h.flip(1))),
    "l1_loss": lambda m, h: m.l1(h, h.roll(1, 1)),
    "smooth_l1_loss": lambda m, h: F.smooth_l1_loss(h, 0.3 * h.flip(1), beta=0.5),
    "huber_loss": lambda m, h: F.huber_loss(h, h.flip(1), delta=0.4, reduction="sum"),
    "cross_entropy": lambda m, h: F.cross_entropy(h, m.labels, label_smoothing=0.1),
    "cross_entropy_soft": lambda m, h: m.ce(h, F.softmax(h.flip(1), 1)),
    "nll_loss": lambda m, h: F.nll_loss(F.log_softmax(h, 1), m.labels, reduction="sum"),
    "kl_div": lambda m, h: F.kl_div(F.log_softmax(h, 1), F.softmax(h.flip(1), 1), reduction="batchmean"),
    "binary_cross_entropy": lambda m, h: F.binary_cross_entropy(torch.sigmoid(h), torch.sigmoid(h.flip(1))),
    "binary_cross_entropy_with_logits": lambda m, h: F.binary_cross_entropy_with_logits(
        h, torch.sigmoid(h.flip(1)), pos_weight=torch.full((8,), 2.0, dtype=h.dtype)),
    "cosine_embedding_loss": lambda m, h: F.cosine_embedding_loss(h, h.flip(1), m.signs, margin=0.1),
    "margin_ranking_loss": lambda m, h: F.margin_ranking_loss(h[:, 0], h[:, 1], m.signs, margin=0.2),
    "soft_margin_loss": lambda m, h: F.soft_margin_loss(h[:, 0], m.signs),
    "hinge_embedding_loss": lambda m, h: F.hinge_embedding_loss(h[:, 0], m.signs, margin=0.5),
    "triplet_margin_loss": lambda m, h: m.triplet(h, h.flip(1), h.roll(1, 0)),
}
OPS = {"cross_entropy_soft": "cross_entropy"}


class WithLoss(nn.Module):
    """Linear -> tanh -> Linear, plus the loss of the hidden activations times a parameter."""

    def __init__(self, loss):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.l1, self.ce, self.triplet = nn.L1Loss(), nn.CrossEntropyLoss(), nn.TripletMarginLoss(margin=0.3)
        self.register_buffer("labels", LABELS.clone())
        self.register_buffer("signs", SIGNS.clone())
        self.loss = loss

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + self.scale * self.loss(self, h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_equal_autograd(name, frontend):
    model = randomise_vectors(WithLoss(CASES[name]).double())
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend, ops=[OPS.get(name, name)])


@pytest.mark.parametrize("name", ["mse_loss", "cross_entropy", "kl_div", "triplet_margin_loss"])
def test_losses_meet_the_small_beta_limit(name):
    model = randomise_vectors(WithLoss(CASES[name]))
    assert dtp_angle(model, torch.randn(5, 4, dtype=torch.float64)) < 0.01


class ReturnsItsLoss(nn.Module):
    """A classifier that takes its labels and returns its own cross-entropy (as Hugging Face
    models given ``labels`` do)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels):
        return F.cross_entropy(self.body(x), labels)


@pytest.mark.parametrize("algorithm", ["bp", "fa", "dtp"])
def test_a_model_returning_its_loss_learns_with_the_identity_loss(algorithm):
    """bp equals autograd's gradient of the returned loss; fa and dtp take a finite step."""
    torch.manual_seed(0)
    model = ReturnsItsLoss().double()
    x, labels = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    learner = fbcompile.learner(fbcompile.compile(model, (x, labels)), algorithm)
    model.zero_grad(set_to_none=True)
    learner.step((x, labels), None, lambda loss, _: loss)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in ours.values())
    if algorithm == "bp":
        reference = torch.autograd.grad(model(x, labels), list(model.parameters()))
        for (name, grad), expected in zip(ours.items(), reference):
            assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-14), name
