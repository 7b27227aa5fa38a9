"""Target-propagation learners: analytic DTP -> BP, learned feedback converges, contracts hold."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import OptionError
from fbcompile.models import build_model
from fbcompile.runtime.diagnostics import angle
from helpers import assert_failed_step_changes_nothing, assert_step_writes_no_state

from test_end_to_end import _detach_variances


def _unit_angles(model, learner_grads, reference, program):
    out = []
    for unit in program.units:
        if unit.params:
            mine = torch.cat([learner_grads[p].reshape(-1) for p in unit.params])
            ref = torch.cat([reference[p].reshape(-1) for p in unit.params])
            out.append(angle(mine, ref))
    return out


def _grads_after_step(learner, model, x, y):
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _bp(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name,shape,options", [
    ("mlp", (784,), {}),
    ("lenet", (1, 32, 32), {}),
], ids=["mlp", "lenet"])
def test_analytic_dtp_with_tiny_beta_is_bp(name, shape, options):
    model = build_model(name, shape, 10, **options).double()
    x, y = torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 10, (8,))
    program = fbcompile.compile(model, x)
    reference = _bp(model, x, y)
    grads = _grads_after_step(fbcompile.learner(program, "dtp", beta=1e-6), model, x, y)
    assert max(_unit_angles(model, grads, reference, program)) < 1.0


def test_analytic_dtp_on_mixer_is_bp_of_the_frozen_statistics_network():
    """Frozen-statistics LayerNorm (paper 002) differentiates LayerNorm with its variance held
    constant, so analytic DTP tends to BP through that network."""
    model = build_model("mixer", (3, 16, 16), 10, patch=4, dim=16, hidden=32).double()
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    program = fbcompile.compile(model, x)
    reference_model = _detach_variances(model)
    reference = {n.replace("norm.", ""): g for n, g in _bp(reference_model, x, y).items()}
    reference = {n: reference.get(n, reference.get(n.replace("norm1.", "norm1.norm.").replace("norm2.", "norm2.norm.")))
                 for n, _ in model.named_parameters()}
    grads = _grads_after_step(fbcompile.learner(program, "dtp", beta=1e-6), model, x, y)
    assert max(_unit_angles(model, grads, reference, program)) < 1.0


def test_analytic_dtp_on_mixer_with_exact_statistics_is_true_bp():
    model = build_model("mixer", (3, 16, 16), 10, patch=4, dim=16, hidden=32).double()
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    reference = _bp(model, x, y)
    grads = _grads_after_step(fbcompile.learner(program, "dtp", beta=1e-6), model, x, y)
    assert max(_unit_angles(model, grads, reference, program)) < 1.0


def test_condition_i_tp_and_dtp_give_the_same_targets():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.LeakyReLU(0.2), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 6, (5,))
    program = fbcompile.compile(model, x, condition="I")
    # beta small enough that the tanh's exact inverse (atanh) sees targets inside (-1, 1): at 0.05,
    # 5 of 100 draws push one outside and the step refuses with NonFiniteError
    tp, dtp = fbcompile.learner(program, "tp", beta=0.01), fbcompile.learner(program, "dtp", beta=0.01)
    grads_tp, grads_dtp = _grads_after_step(tp, model, x, y), _grads_after_step(dtp, model, x, y)
    assert tp.last["delta_norms"].keys() == dtp.last["delta_norms"].keys() and len(tp.last["delta_norms"]) == 3
    for name in tp.last["delta_norms"]:
        assert tp.last["delta_norms"][name] > 0
        assert abs(tp.last["delta_norms"][name] - dtp.last["delta_norms"][name]) <= 1e-8 * tp.last["delta_norms"][name]
    for name in grads_tp:
        assert torch.allclose(grads_tp[name], grads_dtp[name], rtol=1e-8, atol=1e-10)


def _train_feedback_only(source, steps, lr, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(8, 6).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(layer, x), "dtp", feedback=source, input_feedback=True,
                                feedback_steps=20, feedback_lr=lr, sigma=0.1, seed=seed)
    for _ in range(steps):          # forward weights never change: only the feedback trains
        learner.step(torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 6, dtype=torch.float64),
                     lambda out, target: F.mse_loss(out, target))
    return layer.weight.detach(), learner.feedback.weights[0].detach()


def test_ldrl_drives_the_feedback_to_the_transpose():
    weight, feedback = _train_feedback_only("ldrl", 100, 1e-2)
    assert angle(feedback, weight) < 8.0     # G(g) = g B, so J_G = B^T -> W^T


def test_drl_drives_the_feedback_to_the_pseudo_inverse():
    weight, feedback = _train_feedback_only("drl", 100, 3e-2)
    target = torch.linalg.pinv(weight).t()   # J_G = B^T -> W^+
    assert float((feedback - target).norm() / target.norm()) < 0.05


@pytest.mark.parametrize("source", ["random", "lrl", "drl", "ldrl"])
def test_fwdtp_and_learned_dtp_learn(source):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(128, 12)
    y = (x[:, :4] * torch.tensor([1.0, -2.0, 3.0, 0.5])).argmax(1)
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp", beta=0.5, feedback=source,
                                **({} if source == "random" else {"feedback_steps": 2}))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        optimizer.zero_grad()
        losses.append(learner.step(x, y, F.cross_entropy).loss)
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0]
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_learned_feedback_is_trained_by_the_learner_not_the_user_optimizer():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 4)), "dtp", feedback="ldrl")
    aux = learner.parameters()
    assert aux and all(a.requires_grad for a in aux)
    assert not {id(a) for a in aux} & {id(p) for p in model.parameters()}


def test_a_failed_dtp_step_changes_nothing_including_feedback_and_its_optimizer():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp", feedback="ldrl", feedback_steps=2)
    learner.step(x, y, F.cross_entropy)
    bad = x.clone()
    bad[2, 3] = float("inf")
    assert_failed_step_changes_nothing(model, learner, bad, y)


def test_ldrl_state_dict_round_trip_resumes_bitwise():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 6, dtype=torch.float64)), "dtp",
                                    feedback="ldrl", feedback_steps=3, seed=4)
        return model, learner, torch.optim.SGD(model.parameters(), lr=0.1)

    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))

    def train(model, learner, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            learner.step(x, y, F.cross_entropy)
            optimizer.step()

    model, learner, optimizer = make()
    train(model, learner, optimizer, 5)
    straight = [p.detach().clone() for p in model.parameters()]

    model, learner, optimizer = make()
    train(model, learner, optimizer, 2)
    saved = copy.deepcopy((model.state_dict(), learner.state_dict(), optimizer.state_dict()))
    model, learner, optimizer = make()
    learner.step(x, y, F.cross_entropy)           # disturb the fresh learner before loading
    model.load_state_dict(saved[0])
    learner.load_state_dict(saved[1])
    optimizer.load_state_dict(saved[2])
    train(model, learner, optimizer, 3)
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options,pattern", [
    ({"beta": 0.0}, "beta=0.0.*must be > 0"),
    ({"beta": -1}, "beta=-1.*must be > 0"),
    ({"feedback": "learned"}, "feedback='learned'.*'analytic'.*'ldrl'"),
    ({"sigma": 0.1}, "'sigma'.*applies only to learned feedback"),
    ({"feedback_init": "xavier"}, "'feedback_init'.*does not apply to feedback='analytic'"),
    ({"sign": "usf"}, "'sign' does not apply to algorithm 'dtp'"),
])
def test_bad_target_options_name_the_option_and_choices(options, pattern):
    program = fbcompile.compile(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)), torch.randn(2, 3))
    with pytest.raises(OptionError, match=pattern):
        fbcompile.learner(program, "dtp", **options)


def test_units_and_hadamard_options_recompile_the_program():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    program = fbcompile.compile(model, torch.randn(2, 3))
    per_op = fbcompile.learner(program, "dtp", units="op")
    assert len(per_op.program.units) == 3 and len(program.units) == 2
    hadamard = fbcompile.learner(program, "dtp", hadamard=True)
    assert "hadamard" in hadamard.program.rule_for("_1").name
    result = hadamard.step(torch.randn(4, 3), torch.randint(0, 2, (4,)), F.cross_entropy)
    assert math.isfinite(result.loss)


def test_non_finite_targets_are_named():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp")
    exploding = lambda out, t: float("inf") * out.pow(2).sum()      # dL/dout is inf or nan
    with pytest.raises(fbcompile.FBCompileError, match=r"non-finite targets at .*\(beta=0\.1\)"):
        learner.step(x, y, exploding)


@pytest.mark.parametrize("name,shape,options", [
    ("mlp", (20,), {"width": 16, "depth": 3}),
    ("lenet", (1, 32, 32), {}),
    ("mixer", (3, 16, 16), {"patch": 4, "dim": 16, "hidden": 32}),
    ("resnet-small", (3, 16, 16), {}),
], ids=["mlp", "lenet", "mixer", "resnet"])
@pytest.mark.parametrize("algorithm,options_", [("dtp", {}), ("tp", {}), ("dtp", {"feedback": "random"})],
                         ids=["dtp", "tp", "fwdtp"])
def test_compiled_local_gradients_equal_autograd(name, shape, options, algorithm, options_):
    """The unit_error graph gives the same parameter updates as autograd on the local losses."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **options).double()
    x, y = torch.randn(4, *shape, dtype=torch.float64), torch.randint(0, 10, (4,))
    if name == "resnet-small":      # train-mode BatchNorm: exact in the error modes (unit_error) unless frozen there
        assert not fbcompile.compile(model, x, variants={"error": ()}).exact_within_units
    program = fbcompile.compile(model, x)
    exact = program.exact_within_units
    assert exact or name == "mixer"          # the Mixer's frozen-statistics LayerNorm sits inside units
    updates = []
    for compiled in (True, False):
        learner = fbcompile.learner(program, algorithm, seed=1, **options_)
        assert learner.compiled_local == exact
        learner.compiled_local = compiled and exact       # False: the autograd path
        updates.append(_grads_after_step(learner, model, x, y))
    for n in updates[1]:
        scale = max(float(updates[1][n].norm()), 1e-3)
        assert float((updates[0][n] - updates[1][n]).norm()) / scale < 1e-10, n


@pytest.mark.parametrize("source", ["drl", "ldrl"])
def test_learned_feedback_on_a_batchnorm_resnet(source):
    """Reconstruction passes run with the BatchNorm buffers swapped for copies: the step's backward
    (which reads the running statistics) still works, and the statistics move by one forward only."""
    torch.manual_seed(0)
    model = build_model("resnet-small", (3, 16, 16), 10).double()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp", feedback=source, feedback_steps=2)
    learner.step(x, y, F.cross_entropy)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.allclose(mine, theirs, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("algorithm,feedback", [("dtp", "analytic"), ("tp", "analytic"), ("dtp", "random"),
                                                ("dtp", "drl")])
def test_step_writes_state_is_declared_truthfully(algorithm, feedback):
    """Fixed feedback (analytic or random) leaves the learner state alone, so transactions skip its
    snapshot; learned feedback trains its weights every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, feedback=feedback)
    if feedback in ("analytic", "random"):
        assert_step_writes_no_state(model, learner, x, y)
    else:
        before = [p.detach().clone() for p in learner.parameters()]
        learner.step(x, y, F.cross_entropy)
        assert learner.step_writes_state
        assert any(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))
