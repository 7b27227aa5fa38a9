"""Parameters frozen or unfrozen after the learner was built (fine-tuning): left out as autograd
leaves them out, or, where the learner set up its feedback for the parameters trainable at
construction, refused by name (never trained or skipped silently)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from helpers import randomise_vectors

def mlp():
    torch.manual_seed(6)
    return randomise_vectors(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                                           nn.Linear(5, 3)).double())


ALL_LEARNERS = ["bp", "fa", "dfa", "sdfa", "drtp", "shallow", "dtp", "tp", "ddtp-linear", "ddtp-rhl", "mf", "mf-dd"]


@pytest.mark.parametrize("algorithm", ALL_LEARNERS)
def test_parameters_frozen_after_the_learner_was_built_are_left_out_as_if_frozen_before(algorithm):
    """Freezing layers for fine-tuning after building the learner: ddtp's autograd path raised
    autograd's bare 'One of the differentiated Tensors does not require grad'."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for freeze_first in (True, False):
        model = mlp()
        frozen = [model[0].weight, model[2].bias]
        if freeze_first:
            [p.requires_grad_(False) for p in frozen]
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=0)
        if not freeze_first:
            [p.requires_grad_(False) for p in frozen]
        learner.step(x, y, F.cross_entropy)
        assert all(p.grad is None for p in frozen), algorithm
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert any(g is not None for g in grads[1])
    assert all((a is None and b is None) or torch.allclose(a, b, rtol=1e-12, atol=1e-14)
               for a, b in zip(*grads)), algorithm


def test_a_parameter_frozen_after_the_learner_was_built_is_not_stepped_by_mf_dd_immediate():
    """mf-dd made its chunks at construction: it kept perturbing a parameter frozen later and, with
    update="immediate", stepped it."""
    model = mlp()
    x = torch.randn(6, 4, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf-dd", seed=0, update="immediate")
    model[0].weight.requires_grad_(False)
    frozen, trained = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    learner.step(x, torch.tensor([0, 1, 2, 0, 1, 2]), F.cross_entropy)
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[0].bias, trained)


@pytest.mark.parametrize("algorithm,options", [("drtp", {"execution": "unlocked"}), ("mf", {})])
def test_in_step_updates_leave_a_parameter_frozen_after_the_learner_was_built_alone(algorithm, options):
    """The in-step sink applied every update the step handed over: a layer frozen after the learner
    was built (and still in the optimizer) was stepped."""
    model = mlp()
    x = torch.randn(6, 4, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=0, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight.requires_grad_(False)
    frozen, trained = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    learner.step(x, torch.tensor([0, 1, 2, 0, 1, 2]), F.cross_entropy, optimizer=optimizer)
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[0].bias, trained)



@pytest.mark.parametrize("algorithm", ALL_LEARNERS)
def test_a_unit_unfrozen_after_the_learner_was_built_is_trained_or_refused(algorithm):
    """dfa, drtp, ddtp and mf set up projections or heads for the units trainable at construction:
    a unit unfrozen later got none and stayed untrained, silently."""
    model = mlp()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    [p.requires_grad_(False) for p in model[2].parameters()]
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=0)
    [p.requires_grad_(True) for p in model[2].parameters()]
    if algorithm in ("dfa", "sdfa", "drtp", "ddtp-linear", "ddtp-rhl", "mf", "mf-dd"):
        with pytest.raises(FBCompileError, match="'2.weight' was frozen .* when learner .* was built"):
            learner.step(x, y, F.cross_entropy)
        assert all(p.grad is None for p in model.parameters())
    else:
        learner.step(x, y, F.cross_entropy)
        trained = algorithm != "shallow"           # shallow learning never trains a hidden unit
        assert (model[2].weight.grad is not None) == trained
