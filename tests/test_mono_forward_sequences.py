"""Mono-Forward on a model with per-token outputs: its heads classify whole samples (paper 004), so
per-position scores and per-position targets are refused with the shapes named, before anything
changes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from helpers import same, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, BATCH, TOKENS = 11, 2, 7


class TokenModel(nn.Module):
    """embedding -> linear -> per-token logits (batch, tokens, vocab)."""
    def __init__(self):
        super().__init__()
        self.embed, self.hidden, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, 10), nn.Linear(10, VOCAB)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


def per_token_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _program():
    model = TokenModel().double()
    tokens = torch.randint(0, VOCAB, (BATCH, TOKENS))
    return model, tokens, fbcompile.compile(model, tokens)


@pytest.mark.parametrize("algorithm", ["mf", "mf-dd"])
@pytest.mark.parametrize("options", [{}, {"classes": VOCAB}], ids=["classes inferred", "classes given"])
def test_per_token_logits_are_refused_at_construction_naming_the_output_shape(algorithm, options):
    _, _, program = _program()
    with pytest.raises(FBCompileError, match=r"classify whole samples.*output.*shape \(2, 7, 11\)") as raised:
        fbcompile.learner(program, algorithm, **options)
    assert "pool" in str(raised.value) and "another learner" in str(raised.value)


@pytest.mark.parametrize("algorithm", ["mf", "mf-dd"])
def test_per_token_targets_are_refused_at_the_start_of_the_step_changing_nothing(algorithm):
    """With output_head='linear' the output is features a head classifies per sample, which is
    legitimate: then the targets decide, and per-token ones are refused before the forward."""
    model, tokens, program = _program()
    learner = fbcompile.learner(program, algorithm, classes=VOCAB, output_head="linear")
    targets = torch.randint(0, VOCAB, (BATCH, TOKENS))
    learner.step(tokens, targets[:, 0], F.cross_entropy)               # per-sample targets: a step
    for p in model.parameters():
        p.grad = torch.randn_like(p)                                 # .grad must survive the refusal
    before, rng = snapshot(model, learner), torch.random.get_rng_state()
    with pytest.raises(FBCompileError, match=r"targets of shape \(2, 7\).*inputs of shape \(2, 7\)") as raised:
        learner.step(tokens, targets, per_token_loss)
    assert "(2, 11)" in str(raised.value) and "(2,)" in str(raised.value)
    assert same(before, snapshot(model, learner)) and torch.equal(rng, torch.random.get_rng_state())
    with pytest.raises(FBCompileError, match=r"targets of shape \(2, 7\)"):
        learner.local_losses(tokens, targets, per_token_loss)
    assert same(before, snapshot(model, learner))


def test_per_sample_targets_of_either_form_still_step():
    model, tokens, program = _program()
    learner = fbcompile.learner(program, "mf", classes=VOCAB, output_head="linear")
    labels = torch.randint(0, VOCAB, (BATCH,))
    for targets in (labels, F.one_hot(labels, VOCAB).double()):
        model.zero_grad(set_to_none=True)
        result = learner.step(tokens, targets, F.cross_entropy)
        assert set(result.details["unit_losses"]) == {0, 1, 2}
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
