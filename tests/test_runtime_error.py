"""Error-propagation learners: BP equals autograd; FA learns; the shared learner contract."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError, OptionError
from fbcompile.models import build_model
from fbcompile.runtime.diagnostics import angle
from helpers import (assert_failed_step_changes_nothing, assert_resume_is_bitwise, assert_step_writes_no_state,
                     tanh_mlp)
from fbcompile.verify.checks import relative_error


def _autograd(model, x, y, loss_fn=F.cross_entropy):
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name,shape", [("mlp", (30,)), ("lenet", (1, 16, 16)), ("conv1d", (1, 40))])
def test_bp_learner_equals_autograd(name, shape):
    model = build_model(name, shape, 10, **({"width": 32, "depth": 3} if name == "mlp" else {})).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 10, (6,))
    reference = _autograd(model, x, y)
    learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
    result = learner.step(x, y, F.cross_entropy)
    assert math.isclose(result.loss, float(F.cross_entropy(model(x), y).detach()), rel_tol=1e-12)
    for n, p in model.named_parameters():
        assert relative_error(p.grad, reference[n]) < 1e-10, n


def test_grad_accumulates_like_autograd():
    model = tanh_mlp(depth=3)
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 5, (5,))
    reference = _autograd(model, x, y)
    learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
    learner.step(x, y, F.cross_entropy)
    learner.step(x, y, F.cross_entropy)
    learner_grads = {n: p.grad for n, p in model.named_parameters()}
    for n in reference:
        assert relative_error(learner_grads[n], 2 * reference[n]) < 1e-10


def test_fa_learns_and_every_hidden_layer_gets_a_gradient():
    torch.manual_seed(1)
    model = tanh_mlp(depth=2, width=32).float()
    x = torch.randn(128, 12)
    y = (x[:, :5] * torch.arange(1, 6)).argmax(1)
    learner = fbcompile.learner(fbcompile.compile(model, x), "fa", seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        losses.append(learner.step(x, y, F.cross_entropy).loss)
        optimizer.step()
    assert losses[-1] < 0.6 * losses[0]
    for n, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, n


def test_fa_feedback_is_fixed_seeded_and_separate_per_unit():
    model = tanh_mlp(depth=2, width=8)
    x = torch.randn(4, 12, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    a, b = fbcompile.learner(program, "fa", seed=5), fbcompile.learner(program, "fa", seed=5)
    c = fbcompile.learner(program, "fa", seed=6)
    wa, wb, wc = a.feedback.mapping(), b.feedback.mapping(), c.feedback.mapping()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(torch.equal(wa[k], wc[k]) for k in wa)
    first, second = [wa[k] for k in list(wa)[:2]]
    assert not torch.equal(first.reshape(-1)[:8], second.reshape(-1)[:8])
    assert all(not p.requires_grad for p in a.feedback.parameters()) and a.parameters() == []


@pytest.mark.parametrize("sign", ["usf", "frsf", "brsf"])
def test_sign_symmetric_feedback_agrees_in_sign_with_forward_weights(sign):
    model = tanh_mlp(depth=2, width=8)
    x = torch.randn(4, 12, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    learner = fbcompile.learner(program, "fa", sign=sign)
    for key, weight in learner.feedback.mapping().items():
        forward = program.params[learner.feedback.qualnames[key]]
        assert torch.equal(torch.sign(weight), torch.sign(forward))
    learner.step(x, torch.randint(0, 5, (4,)), F.cross_entropy)


def test_unknown_algorithm_and_options_are_named():
    program = fbcompile.compile(tanh_mlp(depth=3), torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(OptionError, match="unknown algorithm 'backprop'.*'bp'"):
        fbcompile.learner(program, "backprop")
    with pytest.raises(OptionError, match="option 'colour'.*'feedback_init'"):
        fbcompile.learner(program, "fa", colour=0.1)
    with pytest.raises(OptionError, match="'beta' does not apply to algorithm 'bp'"):
        fbcompile.learner(program, "bp", beta=0.1)
    with pytest.raises(OptionError, match="sign='maybe'.*'usf'"):
        fbcompile.learner(program, "fa", sign="maybe")






@pytest.mark.parametrize("algorithm", ["bp", "fa"])
def test_a_failed_step_changes_nothing(algorithm):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    learner.step(x, y, F.cross_entropy)       # some existing .grad and state
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert_failed_step_changes_nothing(model, learner, bad, y)


@pytest.mark.parametrize("algorithm,options", [("bp", {}), ("fa", {}), ("fa", {"sign": "usf"}),
                                               ("fa", {"sign": "frsf"}), ("fa", {"sign": "brsf"})])
def test_step_writes_state_is_declared_truthfully(algorithm, options):
    """Only brsf FA draws during a step; the others may skip the transaction's state snapshot."""
    model, x, y = tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **options)
    if options.get("sign") == "brsf":
        generator = learner.feedback.generator.get_state()
        learner.step(x, y, F.cross_entropy)
        assert learner.step_writes_state and not torch.equal(generator, learner.feedback.generator.get_state())
    else:
        assert_step_writes_no_state(model, learner, x, y)


def test_state_dict_round_trip_resumes_bitwise():
    make = lambda: (tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,)))
    assert_resume_is_bitwise(make, "fa", {"sign": "brsf"}, steps=6)


def test_diagnostics_of_bp_are_zero_angles_and_unit_ratios():
    model = tanh_mlp(depth=3)
    x, y = torch.randn(9, 12, dtype=torch.float64), torch.randint(0, 5, (9,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
    report = learner.diagnostics(x, y, F.cross_entropy)
    assert len(report.rows) == 4 and "angle_bp" in str(report)
    for row in report.rows:
        assert row["angle_bp"] < 1e-4 and abs(row["norm_ratio"] - 1) < 1e-10
    assert all(p.grad is None for p in model.parameters())   # diagnostics write nothing
    assert report.rows[-1]["angle_gn"] < 0.1                  # output unit: GN target = gradient target


def test_condition_p_program_is_refused_by_error_mode():
    model = tanh_mlp(depth=3)
    program = fbcompile.compile(model, torch.randn(2, 12, dtype=torch.float64), condition="P")
    with pytest.raises(FBCompileError, match="condition='T'"):
        fbcompile.learner(program, "bp")


def test_angle_helper():
    assert angle(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(90.0)
    assert angle(torch.zeros(2), torch.ones(2)) is None
