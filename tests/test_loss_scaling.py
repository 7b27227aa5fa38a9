"""Loss scaling (fbcompile/runtime/loss_scaling.py): ``learner.step(..., scaler=torch.amp.GradScaler)``
writes S times the updates (float64, exact to rounding), hands an overflow to the scaler (which skips
the optimizer step and lowers S, nothing else changing), and refuses learners whose updates are not
linear in the loss. Before, float16 training had no loss scaling: an overflow raised, and errors
below float16's range were lost."""
import pytest
import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.errors import OptionError
from fbcompile.verify.checks import relative_error
from helpers import grads_of, randomise_vectors, tanh_mlp

LINEAR = ["bp", "fa", "dfa", "shallow"]


def _batch(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.randn(6, 12, dtype=dtype), torch.randint(0, 5, (6,))


def _scaler(scale):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)


@pytest.mark.parametrize("algorithm", LINEAR)
def test_scaled_updates_are_the_scale_times_the_plain_ones_and_unscale_to_them(algorithm):
    x, y = _batch()
    model = randomise_vectors(tanh_mlp().double())
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=3)
    model.zero_grad(set_to_none=True)
    plain = learner.step(x, y, F.cross_entropy)
    expected = {n: g for n, g in grads_of(model).items() if g is not None}     # shallow: the output unit's
    model.zero_grad(set_to_none=True)
    scaler = _scaler(2.0 ** 10)
    result = learner.step(x, y, F.cross_entropy, scaler=scaler)
    assert result.details["loss_scale"] == 2.0 ** 10 and not result.details["overflow"]
    assert abs(result.loss - plain.loss) <= 1e-12 * plain.loss
    scaled = {n: g for n, g in grads_of(model).items() if g is not None}
    assert scaled.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert relative_error(scaled[name], 2.0 ** 10 * grad) < 1e-12, name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    for name, grad in expected.items():
        assert relative_error(grads_of(model)[name], grad) < 1e-12, name


@pytest.mark.parametrize("algorithm", ["bp", "dfa"])
def test_an_overflow_is_handed_to_the_scaler_which_skips_the_step_and_lowers_the_scale(algorithm):
    x, y = _batch(torch.float32)
    model = tanh_mlp().float()
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    owned = [t.detach().clone() for t in learner.state_dict().values() if torch.is_tensor(t)]
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), _scaler(2.0 ** 127)
    model.zero_grad(set_to_none=True)
    result = learner.step(x, y, lambda out, target: 4 * F.cross_entropy(out, target), scaler=scaler)   # S L > 3.4e38
    assert result.details["overflow"]
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(owned, [t for t in learner.state_dict().values() if torch.is_tensor(t)]))
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())     # the optimizer step was skipped
    assert scaler.get_scale() == 2.0 ** 126
    model.zero_grad(set_to_none=True)
    result = learner.step(x, y, F.cross_entropy, scaler=_scaler(2.0 ** 8))
    assert not result.details["overflow"] and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("algorithm", ["dtp", "sdfa", "drtp", "mf", "mf-dd"])
def test_learners_not_linear_in_the_loss_refuse_a_scaler_by_name(algorithm):
    x, y = _batch()
    model = tanh_mlp().double()
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    with pytest.raises(OptionError, match=rf"linear in the loss .*{algorithm!r} is not"):
        learner.step(x, y, F.cross_entropy, scaler=_scaler(2.0 ** 10))
    assert all(p.grad is None for p in model.parameters())


def test_a_scaler_with_in_step_updates_is_refused_and_a_disabled_one_is_a_plain_step():
    x, y = _batch()
    model = tanh_mlp().double()
    learner = fbcompile.learner(fbcompile.compile(model, x), "dfa", seed=1)
    with pytest.raises(OptionError, match="pass one of the two"):
        learner.step(x, y, F.cross_entropy, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     scaler=_scaler(2.0))
    learner.step(x, y, F.cross_entropy)
    expected = grads_of(model)
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert all(torch.equal(grads_of(model)[n], g) for n, g in expected.items())


def test_float16_autocast_with_a_scaler_trains_what_underflows_without_one():
    """A step under float16 autocast whose errors (1e-8 per entry) lie below float16's range: without
    loss scaling the first layer's update is zero; scaled by 2^16 it is the float32 step's."""
    x, y = _batch(torch.float32)
    model = tanh_mlp().float()
    tiny = lambda out, target: 1e-7 * F.cross_entropy(out, target)       # noqa: E731
    with torch.autocast("cpu", dtype=torch.float16):
        learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
        model.zero_grad(set_to_none=True)
        learner.step(x, y, tiny)
        unscaled = grads_of(model)
        model.zero_grad(set_to_none=True)
        scaler = _scaler(2.0 ** 16)
        learner.step(x, y, tiny, scaler=scaler)
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    first = next(name for name in unscaled if name.endswith("weight"))
    reference = torch.autograd.grad(tiny(model(x), y), dict(model.named_parameters())[first])[0]
    assert float(unscaled[first].abs().max()) == 0.0
    assert relative_error(grads_of(model)[first], reference) < 2e-2
