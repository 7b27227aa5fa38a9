"""Max pooling that returns its indices, and max unpooling reading them (SegNet's encoder-decoder),
float64: with distinct indices T and P are exact and T equals autograd (module and functional
spellings, fx and torch.export); a repeated index (overlapping windows) fails the step, naming the
node, and changes nothing; I is refused; every learner steps on a SegNet-style model."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.verify.checks import rule_errors
from helpers import assert_a_step_learns, compare_with_autograd, randomise_vectors, same, snapshot
from test_learners_any_model import LEARNERS, loss_fn
from test_rules_pool import window

TOL = 1e-10
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
UNPOOL = {1: nn.MaxUnpool1d, 2: nn.MaxUnpool2d, 3: nn.MaxUnpool3d}
POOL_F = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
UNPOOL_F = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}


class PoolUnpool(nn.Module):
    """x -> (values, indices) = MaxPool(x); tanh(values) * w unpooled at the indices to x's size."""

    def __init__(self, n, geometry, functional=False):
        super().__init__()
        self.n, self.geometry, self.functional = n, geometry, functional
        self.pool = POOL[n](return_indices=True, **geometry)
        unpool_geometry = {k: geometry[k] for k in ("kernel_size", "stride", "padding")}
        self.unpool = UNPOOL[n](**unpool_geometry)
        self.scale = nn.Parameter(torch.randn(3, *(1,) * n) + 2.0)

    def forward(self, x):
        if self.functional:
            values, indices = POOL_F[self.n](x, return_indices=True, **self.geometry)
            unpool = {k: self.geometry[k] for k in ("kernel_size", "stride", "padding")}
            return UNPOOL_F[self.n](torch.tanh(values) * self.scale, indices, output_size=x.shape[2:], **unpool)
        values, indices = self.pool(x)
        return self.unpool(torch.tanh(values) * self.scale, indices, output_size=x.shape[2:])


def _model(n, geometry, functional, sizes):
    model = PoolUnpool(n, geometry, functional).double()
    x = torch.randn(2, 3, *sizes, dtype=torch.float64)
    try:
        model(x)
    except RuntimeError:          # an output size MaxUnpool itself rejects (padding, ceil_mode)
        assume(False)
    return model, x


def _repeats_an_index(model, x) -> bool:
    indices = model.pool(x)[1].flatten(2).sort(-1).values
    return bool((indices[..., 1:] == indices[..., :-1]).any())


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2]).flatmap(lambda n: st.tuples(st.just(n), window(n))), st.booleans())
def test_pool_with_indices_then_unpool_is_exact_or_refuses_a_repeated_index(case, functional):
    n, (geometry, _, sizes) = case
    model, x = _model(n, geometry, functional, sizes)
    program = fbcompile.compile(model, x)
    if _repeats_an_index(model, x):
        with pytest.raises(FBCompileError, match=r"unpool\w*: max unpooling got one index twice within a plane"):
            program.propagate_error(x, torch.randn_like(x))
        return
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    assert max(compare_with_autograd(model, x, program=program)) < TOL


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_dimension_and_front_end_equals_autograd(frontend, n):
    geometry = {"kernel_size": 2, "stride": 2, "padding": 0}
    model, x = _model(n, geometry, frontend == "fx", (4,) * n)
    program = fbcompile.compile(model, x, frontend=frontend)
    ops = {node.meta["fbcompile"].call.spec.name for node in program.rules}
    assert {f"max_unpool{n}d"} <= ops or n == 1, ops          # export writes 1d unpooling as 2d
    assert max(compare_with_autograd(model, x, program=program)) < TOL


def _unpool_row(program, x):
    rows = fbcompile.verify(program, x, pinv_limit=10_000).rows
    return next(row for row in rows if row["op"].startswith("max_unpool"))


def test_non_overlapping_windows_meet_pjml():
    model, x = _model(2, {"kernel_size": 2, "stride": 2, "padding": 0}, False, (4, 6))
    program = fbcompile.compile(model, x, condition="P")
    assert _unpool_row(program, x)["pjml_rel"] < 1e-9


class SegNet(nn.Module):
    """Conv-BN-ReLU, pool with indices, conv, unpool with the encoder's indices, conv, classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.middle = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.unpool = nn.MaxUnpool2d(2)
        self.decode = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * 6 * 6, classes)

    def forward(self, x):
        values, indices = self.pool(self.encode(x))
        return self.head(self.decode(self.unpool(self.middle(values), indices)).flatten(1))


@pytest.mark.parametrize("algorithm", ["bp", "dtp", "ddtp-linear", "mf"])
def test_a_repeated_index_fails_the_step_and_changes_nothing(algorithm):
    """3x3 windows at stride 1 select some positions twice; unpooling writes two values to one place.
    The rules check it (bp, dtp) and so does the forward where autograd differentiates the unit
    itself (DDTP's and Mono-Forward's local losses)."""
    torch.manual_seed(0)
    model, x, y = SegNet().train(), torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 2, 3, 4, 1])
    model.pool, model.unpool = nn.MaxPool2d(3, 1, padding=1, return_indices=True), nn.MaxUnpool2d(3, 1, padding=1)
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    before, rng = snapshot(model, learner), torch.random.get_rng_state()
    with pytest.raises(FBCompileError, match=r"unpool\w*: max unpooling got one index twice"):
        learner.step(x, y, loss_fn)
    assert same(before, snapshot(model, learner)) and torch.equal(rng, torch.random.get_rng_state())


class UnpoolAtArgmax(nn.Module):
    """Indices from an argmax, not a pool: checked at every step (one per plane: distinct)."""

    def forward(self, x):
        indices = x.flatten(2).argmax(-1, keepdim=True).unsqueeze(-1)
        return F.max_unpool2d(torch.tanh(x[:, :, :1, :1]), indices, 2, output_size=(2, 2))


def test_indices_of_another_origin_are_checked_and_i_is_refused():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert compare_with_autograd(UnpoolAtArgmax(), x)[0] < TOL
    assert _unpool_row(fbcompile.compile(UnpoolAtArgmax(), x, condition="P"), x)["pjml_rel"] < 1e-9
    with pytest.raises(FBCompileError, match="max_unpool2d has more outputs than inputs"):
        fbcompile.compile(UnpoolAtArgmax(), x, condition="I")


@pytest.mark.parametrize("algorithm, options", LEARNERS,
                         ids=["-".join([algorithm, *map(str, options.values())]) for algorithm, options in LEARNERS])
def test_every_learner_steps_on_a_segnet(algorithm, options):
    torch.manual_seed(0)
    model, x, y = SegNet().train(), torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 2, 3, 4, 1])
    assert_a_step_learns(model, fbcompile.learner(fbcompile.compile(model, x), algorithm, **options), x, y, loss_fn)


def test_bp_on_a_segnet_equals_autograd_in_train_mode():
    torch.manual_seed(1)
    model, x = randomise_vectors(SegNet().double().train()), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert max(compare_with_autograd(model, x)) < TOL
