"""A captured graph that baked in the train/eval mode (functional dropout, ``if self.training:``)
refuses to run in the other mode; one built from leaf Dropout/BatchNorm modules runs in both."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import TrainingModeError, UntraceableModelError
from fbcompile.frontends import frontend_of
from fbcompile.mode_guard import canonical_graph, flipped_modes

from helpers import compare_with_autograd, randomise_vectors, same, snapshot


class StochasticDepth(nn.Module):
    """The residual branch is dropped per sample in train mode only (Python control flow)."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        b = torch.tanh(self.a(x))
        if self.training:
            b = b * x.new_empty(x.shape[0], 1).bernoulli_(0.8) / 0.8
        return self.h(x + b)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.h(F.dropout(torch.tanh(self.a(x)), 0.3, self.training))


class CaptureNoise(nn.Module):
    """Draws from torch's RNG in forward on no traced value: refused by fx (it would be a constant
    drawn at capture time, :mod:`fbcompile.random_guard`), a graph op under export."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x)) + 0.1 * torch.rand(1, 8, dtype=torch.float64))


def leaf_modules():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))


def _model(cls, train: bool):
    torch.manual_seed(1)
    return randomise_vectors(cls().double()).train(train)


def _input():
    return torch.randn(5, 6, dtype=torch.float64)


def _flags(model):
    return [(name, m.training) for name, m in model.named_modules()]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("compiled_train", [True, False])
def test_a_mode_dependent_graph_refuses_the_other_mode_and_says_why(frontend, compiled_train):
    model, x = _model(StochasticDepth, compiled_train), _input()
    program = fbcompile.compile(model, x, frontend=frontend)
    compiled, now = ("train", "eval") if compiled_train else ("eval", "train")
    assert f"captured graph depends on the training mode (compiled in {compiled} mode)" in program.explain()
    assert "depends on the training mode" in repr(program)
    model.train(not compiled_train)
    before = {n: p.grad for n, p in model.named_parameters()}
    with pytest.raises(TrainingModeError) as caught:
        program.propagate_error(x, torch.randn(5, 3, dtype=torch.float64))
    message = str(caught.value)
    assert f"compiled in {compiled} mode" in message and f"runs in {now} mode" in message
    assert f"training={not compiled_train}, compiled with training={compiled_train}" in message
    assert "the model (StochasticDepth)" in message          # the first module whose flag differs
    assert "compile the program in the mode you run it in" in message.lower()
    assert f"call model.{now}() before fbcompile.compile" in message
    assert all(p.grad is before[n] for n, p in model.named_parameters())
    with pytest.raises(TrainingModeError, match=f"compiled in {compiled} mode"):
        fbcompile.verify(program, x)
    model.train(compiled_train)                                   # back in its mode, it runs
    if not compiled_train:
        assert max(compare_with_autograd(model, x, program=program)) < 1e-10


def test_the_first_differing_submodule_is_named():
    model, x = _model(FunctionalDropout, True), _input()
    program = fbcompile.compile(model, x)
    model.h.eval()
    with pytest.raises(TrainingModeError, match=r"runs in mixed mode .* module 'h' \(Linear\) has training=False.*"
                                                r"call model.train\(\) and model.get_submodule\('h'\).eval\(\) before"):
        program.propagate_error(x, torch.randn(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functional_dropout_spelling_is_guarded(frontend):
    model, x = _model(FunctionalDropout, False), _input()
    program = fbcompile.compile(model, x, frontend=frontend)
    assert program.mode_guard is not None
    assert max(compare_with_autograd(model, x, program=program)) < 1e-10     # eval mode: exact
    model.train()
    with pytest.raises(TrainingModeError, match="compiled in eval mode but runs in train mode"):
        compare_with_autograd(model, x, program=program)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_leaf_dropout_and_batch_norm_need_no_guard_and_one_program_serves_both_modes(frontend):
    torch.manual_seed(2)
    model, x = randomise_vectors(leaf_modules().double()).train(), _input()
    program = fbcompile.compile(model, x, frontend=frontend)
    assert program.mode_guard is None and "training mode" not in program.explain()
    model.eval()
    assert max(compare_with_autograd(model, x, program=program)) < 1e-10
    model.train()
    program.propagate_error(x, torch.randn(5, 3, dtype=torch.float64))     # no error in train mode


@pytest.mark.parametrize("algorithm", ["dtp", "dfa"])
def test_a_learner_step_in_the_other_mode_raises_before_anything_changes(algorithm):
    model, x = _model(StochasticDepth, True), _input()
    y = torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    learner.step(x, y, F.cross_entropy)             # some .grad and learner state to keep
    model.eval()
    before, rng = snapshot(model, learner), torch.get_rng_state()
    with pytest.raises(TrainingModeError, match="compiled in train mode but runs in eval mode"):
        learner.step(x, y, F.cross_entropy)
    assert same(before, snapshot(model, learner)) and torch.equal(rng, torch.get_rng_state())
    model.train()
    learner.step(x, y, F.cross_entropy)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("cls", [StochasticDepth, CaptureNoise, leaf_modules])
def test_compile_leaves_training_flags_and_the_random_state_as_they_were(frontend, cls):
    model, x = _model(cls, True), _input()
    list(model.children())[1].eval()                      # mixed modes
    flags, rng = _flags(model), torch.get_rng_state()
    if cls is CaptureNoise and frontend == "fx":
        with pytest.raises(UntraceableModelError, match="torch's generator"):
            fbcompile.compile(model, x, frontend=frontend)
    else:
        fbcompile.compile(model, x, frontend=frontend)
    assert _flags(model) == flags and torch.equal(rng, torch.get_rng_state())


def test_a_draw_at_capture_goes_to_export_and_is_not_mistaken_for_a_mode_dependence():
    model, x = _model(CaptureNoise, True), _input()
    twin = _model(CaptureNoise, True)
    program = fbcompile.compile(model, x)
    assert frontend_of(program.traced)[0] == "export"
    assert program.mode_guard is None
    with pytest.raises(UntraceableModelError):
        fbcompile.capture.capture(twin, 1)
    assert set(vars(model)) == set(vars(twin))     # the refused capture left no constant on the model


def test_flags_are_restored_when_the_second_capture_fails():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            if not self.training and x.sum() > 0:     # only the eval-mode capture cannot trace this
                return x
            return self.a(x)

    model = Untraceable().double().train()
    model.a.eval()
    flags = _flags(model)
    program = fbcompile.compile(model, _input(), frontend="fx")
    assert _flags(model) == flags
    assert "capturing it with the flags flipped fails" in program.mode_guard.where
    model.eval()
    with pytest.raises(TrainingModeError):
        program.propagate_error(_input(), torch.randn(5, 3, dtype=torch.float64))


def test_flipped_modes_restores_every_flag_on_error():
    model = leaf_modules().train()
    model[3].eval()
    flags = _flags(model)
    with pytest.raises(RuntimeError, match="inside"):
        with flipped_modes(list(model.modules())):
            assert [m.training for m in model.modules()] == [not f for _, f in flags]
            raise RuntimeError("inside")
    assert _flags(model) == flags


def test_canonical_graph_ignores_names_but_not_constants():
    def f(x):
        return F.dropout(torch.tanh(x), 0.3, True)

    def g(y):
        return F.dropout(torch.tanh(y), 0.3, True)

    def h(x):
        return F.dropout(torch.tanh(x), 0.3, False)

    trace = lambda fn: canonical_graph(torch.fx.symbolic_trace(fn).graph, nn.Module())
    assert trace(f) == trace(g) and trace(f) != trace(h)


def test_recompile_keeps_the_guard():
    model, x = _model(FunctionalDropout, True), _input()
    program = fbcompile.compile(model, x).recompile(units="op")
    model.eval()
    with pytest.raises(TrainingModeError):
        program.propagate_error(x, torch.randn(5, 3, dtype=torch.float64))
