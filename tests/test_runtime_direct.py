"""Direct feedback learners: DFA, sDFA, DRTP, shallow, DDTP-linear, DDTP-RHL."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.errors import FBCompileError, OptionError
from fbcompile.models import build_model
from helpers import (assert_failed_step_changes_nothing, assert_resume_is_bitwise, assert_step_writes_no_state,
                     built_on_cpu, same, snapshot, step_grads, tanh_mlp)


DIRECT = ["dfa", "sdfa", "drtp", "shallow", "ddtp-linear", "ddtp-rhl"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second thread only adds synchronisation (and, on a busy machine,
    contention that makes each step ten times slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- the update rules, exactly (ALGORITHMS.md check 5) --------------------------------------------
@pytest.mark.parametrize("algorithm,options", [
    ("dfa", {}), ("sdfa", {}), ("sdfa", {"batch_scaling": "none"}),
    ("drtp", {}), ("drtp", {"batch_scaling": "none"}), ("drtp", {"execution": "stored"})])
def test_first_layer_gradient_is_the_projected_signal_times_the_derivative(algorithm, options):
    model = tanh_mlp()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=4, **options)
    grads = step_grads(learner, model, x, y)
    with torch.no_grad():
        error = (torch.softmax(model(x), 1) - F.one_hot(y, 5)) / len(x)          # dL/dlogits
        scale = 1.0 / len(x) if options.get("batch_scaling", "mean") == "mean" else 1.0
        signal = {"dfa": error, "sdfa": torch.sign(error) * scale,
                  "drtp": -F.one_hot(y, 5).double() * scale}[algorithm]
        B = learner.projections.weights[0]                                        # (C, 16)
        derivative = 1 - torch.tanh(model[0](x)) ** 2
        delta = (signal @ B) * derivative
        torch.testing.assert_close(grads["0.weight"], delta.t() @ x, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads["0.bias"], delta.sum(0), rtol=1e-12, atol=1e-14)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()          # the output unit learns from its own gradient e
    torch.testing.assert_close(grads["4.weight"], model[4].weight.grad, rtol=1e-12, atol=1e-14)


def test_conv_units_get_projections_to_their_full_output_shape():
    model = build_model("lenet", (1, 8, 8), 10).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(model, x), "dfa")
    shapes = [tuple(w.shape) for w in learner.projections.weights]
    assert shapes == [(10, 6, 4, 4), (10, 64), (10, 120), (10, 84)]
    bound = (6 / (6 * 4 * 4)) ** 0.5                   # he_uniform, n = features of the unit output
    assert float(learner.projections.weights[0].abs().max()) <= bound
    assert float(learner.projections.weights[0].abs().max()) > 0.9 * bound


@pytest.mark.parametrize("options,bound", [
    ({}, (6 / 16) ** 0.5), ({"projection_fan": "signal"}, (6 / 5) ** 0.5),
    ({"projection_init": "xavier_uniform"}, (6 / (16 + 5)) ** 0.5),
    ({"projection_init": "uniform", "projection_scale": 0.25}, 0.25)])
def test_projection_initialisations_have_their_documented_bounds(options, bound):
    program = fbcompile.compile(tanh_mlp(width=16, classes=5), torch.randn(2, 12, dtype=torch.float64))
    weight = fbcompile.learner(program, "dfa", **options).projections.weights[0]
    assert tuple(weight.shape) == (5, 16)
    assert 0.7 * bound < float(weight.abs().max()) <= bound


def test_ddtp_linear_signal_is_e_q_with_the_freshly_trained_q():
    model = tanh_mlp()
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "ddtp-linear", seed=1)
    before = learner.projections.weights[0].detach().clone()
    grads = step_grads(learner, model, x, y)
    Q = learner.projections.weights[0].detach()
    assert not torch.equal(before, Q)                  # DRL ran before the forward update
    with torch.no_grad():
        error = (torch.softmax(model(x), 1) - F.one_hot(y, 5)) / len(x)
        delta = (error @ Q) * (1 - torch.tanh(model[0](x)) ** 2)
    torch.testing.assert_close(grads["0.weight"], delta.t() @ x, rtol=1e-12, atol=1e-14)


def test_drl_drives_ddtp_linear_feedback_to_the_pseudo_inverse():
    torch.manual_seed(3)
    # the weights and inputs of a CPU run on every device (the 5% bound is calibrated on them)
    model, x = built_on_cpu(lambda: (nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False)).double(),
                                     torch.randn(64, 8, dtype=torch.float64)))
    learner = fbcompile.learner(fbcompile.compile(model, x), "ddtp-linear", feedback_optimizer="sgd",
                                feedback_lr=0.3, sigma=0.1, feedback_steps=150)
    learner.train_feedback(x)
    for group in learner.feedback_optimizer.param_groups:
        group["lr"] /= 10
    learner.train_feedback(x)
    target = torch.linalg.pinv(model[1].weight.detach()).t()           # g(y) = y Q, J_g = Q^T -> W^+
    Q = learner.projections.weights[0].detach()
    assert float((Q - target).norm() / target.norm()) < 0.05
    assert all(p.grad is None for p in model.parameters())


def test_ddtp_rhl_signal_is_the_difference_corrected_target_of_its_maps():
    model = tanh_mlp()
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "ddtp-rhl", feedback_hidden=32, beta=0.05)
    grads = step_grads(learner, model, x, y)
    maps = learner.feedback_maps
    with torch.no_grad():
        out = model(x)
        error = (torch.softmax(out, 1) - F.one_hot(y, 5)) / len(x)
        g = lambda v: torch.tanh(torch.tanh(v @ maps.R) @ maps.Q[0] + maps.b[0])
        delta = (g(out) - g(out - 0.05 * error)) / 0.05 * (1 - torch.tanh(model[0](x)) ** 2)
    torch.testing.assert_close(grads["0.weight"], delta.t() @ x, rtol=1e-10, atol=1e-13)
    assert tuple(maps.R.shape) == (5, 32) and not maps.R.requires_grad
    assert {id(p) for p in learner.parameters()} == {id(p) for p in [*maps.Q, *maps.b]}


# -- paper 001's alignment theorem -----------------------------------------------------------------
@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_drtp_signals_are_within_90_degrees_of_bp_in_linear_hidden_networks(output):
    torch.manual_seed(0)
    model = tanh_mlp(inputs=10, width=12, depth=3, classes=4, bias=False)
    model = nn.Sequential(*[m for m in model if isinstance(m, nn.Linear)])  # linear hidden layers
    for p in model.parameters():
        nn.init.zeros_(p)                                                   # the theorem's zero init
    x, y = torch.randn(1, 10, dtype=torch.float64), torch.tensor([2])
    loss_fn = ((lambda out, t: F.binary_cross_entropy_with_logits(out, F.one_hot(t, 4).double()))
               if output == "sigmoid" else F.cross_entropy)
    program = fbcompile.compile(model, x)
    learner = fbcompile.learner(program, "drtp", seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    hidden = [p for p in learner.plan.projections]
    positive = 0
    for _ in range(12):
        values = {}
        with torch.enable_grad():
            h = x
            for index, layer in enumerate(model):
                h = layer(h)
                values[index] = h
            bp = torch.autograd.grad(loss_fn(h, y), [values[i] for i in range(len(hidden))])
        for projection, bp_signal in zip(hidden, bp):
            drtp_signal = -F.one_hot(y, 4).double() @ learner.projections.flat(projection.index)
            dot = float((drtp_signal * bp_signal).sum())
            assert dot >= -1e-15
            positive += dot > 0
        optimizer.zero_grad()
        learner.step(x, y, loss_fn)
        optimizer.step()
    assert positive >= 2 * len(hidden)


# -- learning ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data.train_x[:480], data.train_y[:480]


# sDFA's sign(e) = 1 - 2y* under softmax has a large class-independent part (paper 001 section 2.3: the
# C - 1 wrong-class entries outweigh the right one), so it learns much more slowly than the others.
LEARNING = {"dfa": (3e-3, 0.6), "sdfa": (1e-2, 0.8), "drtp": (3e-3, 0.6), "shallow": (1e-2, 0.6),
            "ddtp-linear": (3e-3, 0.6), "ddtp-rhl": (3e-3, 0.6)}


@pytest.mark.parametrize("algorithm", DIRECT)
def test_every_algorithm_learns_on_digits(algorithm, digits):
    x, y = digits
    lr, factor = LEARNING[algorithm]
    torch.manual_seed(0)
    model = built_on_cpu(lambda: build_model("mlp", (1, 8, 8), 10, width=64, depth=2))    # a CPU run's weights
    learner = fbcompile.learner(fbcompile.compile(model, x[:4]), algorithm, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = [sum(_train_batch(learner, optimizer, x[s:s + 48], y[s:s + 48]) for s in range(0, len(x), 48))
              for epoch in range(12)]
    assert losses[-1] < factor * losses[0], losses
    for layer in (model[1], model[3]):
        if algorithm == "shallow":
            assert layer.weight.grad is None and layer.bias.grad is None
        else:
            assert float(layer.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("algorithm", ["dfa", "drtp"])
def test_dfa_and_drtp_learn_a_cnn(algorithm, digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 10))
    learner = fbcompile.learner(fbcompile.compile(model, x[:4]), algorithm)
    assert tuple(learner.projections.weights[0].shape) == (10, 256)      # conv+tanh+pool+flatten: one unit
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [sum(_train_batch(learner, optimizer, x[s:s + 48], y[s:s + 48]) for s in range(0, len(x), 48))
              for epoch in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(model[0].weight.grad.abs().sum()) > 0


def _train_batch(learner, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = learner.step(x, y, F.cross_entropy).loss
    optimizer.step()
    return loss


# -- the contract --------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,options,pattern", [
    ("dfa", {"execution": "unlocked"}, "'execution' does not apply to algorithm 'dfa'.*'drtp'"),
    ("dfa", {"batch_scaling": "none"}, "'batch_scaling' does not apply to algorithm 'dfa'"),
    ("drtp", {"execution": "eager"}, "execution='eager'.*'stored' or 'unlocked'"),
    ("sdfa", {"batch_scaling": "sum"}, "batch_scaling='sum'.*'mean' or 'none'"),
    ("drtp", {"projection_init": "orthogonal"}, "projection_init='orthogonal'.*'he_uniform'"),
    ("dfa", {"projection_init": "uniform"}, "needs projection_scale"),
    ("dfa", {"projection_scale": 0.1}, "'projection_scale'.*only to projection_init='uniform' or 'normal'"),
    ("dfa", {"projection_init": "normal", "projection_scale": 1.0, "projection_fan": "signal"},
     "'projection_fan'.*only to projection_init='he_uniform'"),
    ("ddtp-linear", {"feedback_hidden": 64}, "'feedback_hidden' does not apply to algorithm 'ddtp-linear'"),
    ("ddtp-rhl", {"feedback_activation": "relu"}, "feedback_activation='relu'.*'linear' or 'tanh'"),
    ("ddtp-rhl", {"sigma": 0}, "sigma=0.*must be > 0"),
    ("shallow", {"projection_init": "he_uniform"}, "'projection_init' does not apply to algorithm 'shallow'"),
])
def test_bad_options_name_the_option_and_the_choices(algorithm, options, pattern):
    program = fbcompile.compile(tanh_mlp(), torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(OptionError, match=pattern):
        fbcompile.learner(program, algorithm, **options)


def test_drtp_refuses_labels_it_cannot_project():
    model = tanh_mlp()
    x = torch.randn(4, 12, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(model, x), "drtp")
    with pytest.raises(FBCompileError, match=r"labels must lie in \[0, 5\)"):
        learner.step(x, torch.tensor([0, 1, 2, 7]), F.cross_entropy)
    with pytest.raises(FBCompileError, match=r"class indices of shape \(4,\) or one-hot targets of shape \(4, 5\)"):
        learner.step(x, torch.zeros(4, 3, dtype=torch.float64), F.mse_loss)
    assert all(p.grad is None for p in model.parameters())
    one_hot = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).double()             # dense targets work too
    dense = step_grads(learner, model, x, one_hot, lambda out, t: F.cross_entropy(out, t.argmax(1)))
    labels = step_grads(learner, model, x, torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(dense["0.weight"], labels["0.weight"], rtol=1e-14, atol=0)


@pytest.mark.parametrize("algorithm", DIRECT)
def test_a_failed_step_changes_nothing(algorithm):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **(
        {"feedback_hidden": 16} if algorithm == "ddtp-rhl" else {}))
    learner.step(x, y, F.cross_entropy)
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert_failed_step_changes_nothing(model, learner, bad, y)


@pytest.mark.parametrize("algorithm,execution", [("dfa", None), ("sdfa", None), ("drtp", "unlocked"),
                                                 ("drtp", "stored"), ("shallow", "unlocked")])
def test_learners_that_declare_a_read_only_step_write_no_state(algorithm, execution):
    """Transactions skip the state snapshot of learners with step_writes_state = False; a step
    of theirs must then leave everything in state_dict but the step count as it was."""
    torch.manual_seed(0)
    model, x, y = tanh_mlp(), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm,
                                **({"execution": execution} if execution else {}))
    assert_step_writes_no_state(model, learner, x, y)
    assert model[-1].weight.grad is not None and model[-1].weight.grad.abs().sum() > 0    # the step did learn


@pytest.mark.parametrize("algorithm,execution", [("dfa", None), ("drtp", "unlocked"), ("drtp", "stored")])
def test_loading_projections_after_the_update_graphs_exist_uses_them(algorithm, execution):
    """The generated update graphs hold the learner's own B_u objects: a state loaded into a
    learner that has already stepped gives the updates of the learner it came from."""
    torch.manual_seed(0)
    model, x, y = tanh_mlp(), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    options = {"execution": execution} if execution else {}
    program = fbcompile.compile(model, x)
    stepped = fbcompile.learner(program, algorithm, seed=1, **options)
    source = fbcompile.learner(program, algorithm, seed=2, **options)
    assert stepped.compiled
    step_grads(stepped, model, x, y)
    stepped.load_state_dict(source.state_dict())
    after_load, expected = step_grads(stepped, model, x, y), step_grads(source, model, x, y)
    assert same(after_load, expected)


@pytest.mark.parametrize("algorithm", ["dfa", "drtp", "ddtp-linear", "ddtp-rhl"])
def test_state_dict_round_trip_resumes_bitwise(algorithm):
    options = {"feedback_hidden": 16} if algorithm == "ddtp-rhl" else {}

    make = lambda: (tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,)))
    assert_resume_is_bitwise(make, algorithm, options)


def test_projections_are_seeded_separate_per_unit_and_in_the_state_dict():
    program = fbcompile.compile(tanh_mlp(width=5, classes=5), torch.randn(2, 12, dtype=torch.float64))
    a, b, c = (fbcompile.learner(program, "dfa", seed=s) for s in (3, 3, 4))
    wa, wb, wc = (list(learner.projections.weights) for learner in (a, b, c))
    assert all(torch.equal(p, q) for p, q in zip(wa, wb))
    assert not any(torch.equal(p, q) for p, q in zip(wa, wc))
    assert not torch.equal(wa[0], wa[1])
    assert all(not p.requires_grad for p in wa) and a.parameters() == []
    assert set(a.state_dict()["projections"]) == {"weights.0", "weights.1"}
    assert "generator" in a.state_dict()


@pytest.mark.parametrize("algorithm", ["dfa", "drtp", "shallow", "ddtp-linear"])
def test_diagnostics_run_and_change_nothing(algorithm):
    model = tanh_mlp()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    before = snapshot(model, learner)
    report = learner.diagnostics(x, y, F.cross_entropy)
    assert same(before, snapshot(model, learner))
    assert len(report.rows) == 3
    assert report.rows[-1]["angle_bp"] < 1e-4                  # the output unit learns from e
    if algorithm == "shallow":
        assert report.rows[0]["angle_bp"] is None
    else:
        assert 0 < report.rows[0]["angle_bp"] < 180
    if algorithm == "ddtp-linear":
        assert report.rows[0]["reconstruction"] > 0
