"""In-step updates (``learner.step(..., optimizer=)``, fbcompile.runtime.in_step): each unit's update
applied as soon as it is made, equal to the default step followed by ``optimizer.step()``, a failed
step changing nothing, and a peak memory that holds no update per parameter."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.bench import memory_ledger
from fbcompile.errors import FBCompileError, NonFiniteError

from helpers import optimizer_steps


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3)).double()


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def make(model, algorithm="drtp", compiled=True, optimizer="adam", **options):
    x, _ = batch()
    learner = fbcompile.learner(fbcompile.compile(model, x[:2]), algorithm, **options)
    if not compiled and algorithm != "mf":        # mf has one executor, local autograd
        learner.compiled = False
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    return learner, opt


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-unlocked", "update-unlocked"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("algorithm", ["drtp", "shallow", "mf"])
def test_in_step_updates_equal_the_step_then_optimizer_step(compiled, optimizer, algorithm):
    """Three steps each way from the same state and random seed (the model has dropout, so the
    applying pass must replay the checking pass's random numbers): parameters, BatchNorm running
    statistics and optimizer state agree exactly, and the in-step run leaves no .grad."""
    reference, applied = convnet(), convnet()
    runs = []
    for model, in_step in ((reference, False), (applied, True)):
        learner, opt = make(model, algorithm, compiled, optimizer)
        torch.manual_seed(5)
        result = optimizer_steps(learner, opt, [batch(step) for step in range(3)], in_step)
        runs.append((learner, opt, result))
    (_, ref_opt, ref_result), (learner, opt, result) = runs
    assert result.details["in_step"] and result.details["executor"] == learner.executor.name
    assert learner.executor.name == ("compiled-unlocked" if compiled and algorithm != "mf" else "update-unlocked")
    assert result.loss == ref_result.loss and learner.steps == 3
    for (name, a), b in zip(reference.state_dict().items(), applied.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(reference[0].weight, convnet()[0].weight) or algorithm == "shallow"
    for ref_head, head in zip(runs[0][0].parameters(), learner.parameters()):      # mf's heads, the learner's own
        assert torch.equal(ref_head, head)
    assert all(p.grad is None for p in applied.parameters())
    for (key, a), b in zip(ref_opt.state_dict()["state"].items(), opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a), key


@pytest.mark.parametrize("algorithm,compiled", [("drtp", True), ("drtp", False), ("mf", True)],
                         ids=["drtp-compiled-unlocked", "drtp-update-unlocked", "mf"])
def test_a_failed_in_step_update_changes_nothing(algorithm, compiled):
    """A non-finite update in a late unit, after earlier units' updates were made: parameters,
    optimizer state, BatchNorm statistics, .grad and the learner's own heads stay as they were (a
    one-pass step would have applied the first units' updates already)."""
    model = convnet()
    learner, opt = make(model, algorithm, compiled=compiled)
    x, y = batch()
    learner.step(x, y, F.cross_entropy, optimizer=opt)
    with torch.no_grad():
        model[7].bias[0] = float("nan")            # the last hidden unit's output turns nan
    params = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    heads = [h.detach().clone() for h in learner.parameters()]
    with pytest.raises(NonFiniteError, match=r"non-finite update for 7\.weight"):
        learner.step(x, y, F.cross_entropy, optimizer=opt)
    assert all(torch.equal(h, g) for h, g in zip(heads, learner.parameters()))
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]) or (value.isnan() == params[name].isnan()).all(), name
    assert torch.equal(model[0].weight, params["0.weight"]) and torch.equal(model[1].running_mean, params["1.running_mean"])
    for key, state in opt.state_dict()["state"].items():
        assert all(torch.equal(state[k], opt_state["state"][key][k]) for k in state), key
    assert all(p.grad is None for p in model.parameters()) and learner.steps == 1


def test_an_applying_pass_that_fails_after_applying_says_what_was_applied():
    """Should the applying pass fail after the checking pass passed, the error names the updates
    already applied instead of claiming nothing changed."""
    model = convnet()
    learner, _ = make(model)

    class FailingSecondStep(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            FailingSecondStep.calls += 1
            if FailingSecondStep.calls == 2:
                raise RuntimeError("device lost")
            return super().step(closure)

    x, y = batch()
    with pytest.raises(FBCompileError, match=r"were already applied: device lost") as caught:
        learner.step(x, y, F.cross_entropy, optimizer=FailingSecondStep(model.parameters(), lr=0.1))
    assert "0.weight" in str(caught.value)


def test_in_step_updates_are_refused_where_they_cannot_hold():
    model = convnet()
    x, y = batch()
    for algorithm, options in (("dfa", {}), ("drtp", {"execution": "stored"}), ("bp", {}), ("mf-dd", {})):
        learner, opt = make(model, algorithm, **options)
        with pytest.raises(FBCompileError, match="cannot apply its updates inside the step"):
            learner.step(x, y, F.cross_entropy, optimizer=opt)
    learner, opt = make(model)
    with pytest.raises(FBCompileError, match="must be a torch.optim.Optimizer"):
        learner.step(x, y, F.cross_entropy, optimizer="sgd")
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(FBCompileError, match=r"need every \.grad to be None.*0\.weight has one"):
        learner.step(x, y, F.cross_entropy, optimizer=opt)
    model[0].weight.grad = None
    partial = torch.optim.SGD(list(model.parameters())[2:], lr=0.1)
    for algorithm in ("drtp", "mf"):
        learner, _ = make(model, algorithm)
        with pytest.raises(FBCompileError, match=rf"parameter '0\.weight' is trained by '{algorithm}' but not in the optimizer"):
            learner.step(x, y, F.cross_entropy, optimizer=partial)
        assert learner.steps == 0
    shallow, _ = make(model, "shallow")          # its hidden units do not learn: an optimizer of the output unit is enough
    shallow.step(x, y, F.cross_entropy, optimizer=torch.optim.SGD(model[9].parameters(), lr=0.1))
    assert shallow.steps == 1


@pytest.mark.cpu_only("tensor memory from the profiler's CPU ledger")
def test_an_in_step_update_holds_no_update_per_parameter():
    """On a deep, wide MLP the default step's peak includes one update per parameter; in-step it
    holds about one layer's: under a third of the default peak, and nothing left allocated."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 256), nn.Tanh()]
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    learner = fbcompile.learner(fbcompile.compile(model, x[:2]), "drtp")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def default():
        opt.zero_grad()
        learner.step(x, y, F.cross_entropy)

    def in_step():
        opt.zero_grad()
        learner.step(x, y, F.cross_entropy, optimizer=opt)

    default(), in_step()
    default_peak, default_net = memory_ledger(default)
    opt.zero_grad()
    in_step_peak, in_step_net = memory_ledger(in_step)
    assert default_peak >= param_bytes and default_net >= param_bytes
    assert in_step_peak < default_peak / 3 and in_step_net <= 0


def test_train_with_in_step_updates_equals_the_default_run(capsys, tmp_path):
    """``fbcompile train --in-step-updates``: the same model after an epoch as without it (bitwise),
    recorded in config.json, and refused with its reason for a learner that needs the output error."""
    from fbcompile.cli import main
    from fbcompile.training import load_checkpoint
    common = ["train", "--model", "mlp", "--model-option", "width=16", "--model-option", "depth=2", "--threads", "1",
              "--algo", "drtp", "--subset", "128", "--epochs", "1", "--no-progress", "--no-plot"]
    assert main(common + ["--out", str(tmp_path / "default")]) == 0
    assert main(common + ["--in-step-updates", "--out", str(tmp_path / "in-step")]) == 0
    default, in_step = (load_checkpoint(tmp_path / name) for name in ("default", "in-step"))
    assert set(default["model"]) == set(in_step["model"])
    for name, value in default["model"].items():
        assert torch.equal(value, in_step["model"][name]), name
    assert json.loads((tmp_path / "in-step" / "config.json").read_text())["in_step_updates"] is True
    capsys.readouterr()
    refused = [arg if arg != "drtp" else "dfa" for arg in common]
    assert main(refused + ["--in-step-updates", "--out", str(tmp_path / "dfa")]) == 2
    assert "cannot apply its updates inside the step" in capsys.readouterr().err


def test_in_step_updates_on_a_residual_convnet_equal_the_default_step():
    """torchvision's ResNet-18 layout (skip adds, downsample branches, BatchNorm on batch
    statistics), float64: two in-step steps equal two default steps followed by optimizer.step()."""
    from fbcompile.bench import model_batch
    runs = []
    for in_step in (False, True):
        model, x, y = model_batch("resnet18-imagenet", (3, 32, 32), 4)
        model, x = model.double(), x.double()
        learner = fbcompile.learner(fbcompile.compile(model, x[:2]), "drtp")
        optimizer_steps(learner, torch.optim.Adam(model.parameters(), lr=1e-3), [(x, y)] * 2, in_step)
        runs.append(model.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


def test_a_rollback_restores_a_learners_optimizer_in_place():
    """Mono-Forward's head optimizer after a failed step: the same state tensors (no new
    allocation; in-step updates roll back every checking pass) holding the values they had; a
    failed first step, whose block created the state, leaves none."""
    model = convnet()
    learner, _ = make(model, "mf")
    x, y = batch()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        learner.step(bad, y, F.cross_entropy)
    assert not learner.head_optimizer.state
    learner.step(x, y, F.cross_entropy)
    state = learner.head_optimizer.state
    before = {(id(p), k): (v, v.clone()) for p, s in state.items() for k, v in s.items() if torch.is_tensor(v)}
    assert before
    with pytest.raises(NonFiniteError):
        learner.step(bad, y, F.cross_entropy)
    after = {(id(p), k): v for p, s in learner.head_optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)}
    assert after.keys() == before.keys()
    for key, (tensor, value) in before.items():
        assert after[key] is tensor and torch.equal(tensor, value), key


def test_a_resumed_in_step_run_equals_the_uninterrupted_one(tmp_path):
    """`train --in-step-updates` for 2 epochs straight, and 1 epoch then --resume to 2: the same
    model bitwise (the setting is part of the saved configuration and cannot change on resume)."""
    from fbcompile.cli import main
    from fbcompile.training import load_checkpoint
    argv = ["train", "--model", "mlp", "--model-option", "width=16", "--model-option", "depth=2", "--threads", "1",
            "--algo", "mf", "--subset", "96", "--batch-size", "32", "--in-step-updates", "--no-progress", "--no-plot"]
    assert main(argv + ["--epochs", "2", "--out", str(tmp_path / "straight")]) == 0
    assert main(argv + ["--epochs", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--epochs", "2", "--in-step-updates"]) == 2
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--epochs", "2", "--no-progress", "--no-plot"]) == 0
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert resumed["epoch"] == 2 and resumed["config"]["in_step_updates"] is True
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


@pytest.mark.cpu_only("tensor memory from the profiler's CPU ledger")
def test_bench_cli_adds_an_in_step_row_where_the_algorithm_can(capsys):
    """`fbcompile bench --in-step-updates`: "drtp (in-step)" next to drtp, with a lower peak; none for
    dfa, which needs the output error first."""
    from fbcompile.cli import main
    assert main(["bench", "--model", "mlp", "--model-option", "width=64", "--model-option", "depth=4",
                 "--input-shape", "32", "--batch-size", "16", "--rounds", "1", "--warmup", "1",
                 "--algos", "drtp,dfa", "--in-step-updates", "--json"]) == 0
    rows = {row["configuration"]: row for row in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == {"autograd", "drtp", "drtp (in-step)", "dfa"}
    assert rows["drtp (in-step)"]["peak MB"] < rows["drtp"]["peak MB"]
