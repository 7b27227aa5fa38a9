"""Structural, arithmetic and dropout rules (float64): reshapes, transposes, permutes, cat, split,
chunk, basic indexing, copies (expand, repeat, tile), roll, flip, unbind, stack, .T/.mT, add/sub with
broadcasting and alpha, mul/div by constants, neg, dropout."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.errors import UnsupportedOpError
from fbcompile.verify.checks import rule_errors

from helpers import assert_equals_autograd_under_one_seed, compare_with_autograd, step_grads
from test_conditions import Fn, assert_condition
from fbcompile.runtime.diagnostics import angle

TOL = 1e-10


class Lambda(nn.Module):
    """A model from a function of x (and of the module's own constants)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(torch.tanh(x))


def assert_exact(model, x, **compile_options):
    program = fbcompile.compile(model, x, **compile_options)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, (name, tjml_rel, gap)
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL and param_rel < TOL
    return program


SHAPE = (3, 4, 2, 3)
STRUCTURAL = {
    "flatten": lambda h: h.flatten(1),
    "flatten_mid": lambda h: torch.flatten(h, 1, 2),
    "nn_flatten": nn.Flatten(2),
    "view": lambda h: h.view(h.size(0), -1),
    "view_tuple": lambda h: h.view((3, 8, 3)),
    "reshape": lambda h: h.reshape(3, 2, 12),
    "torch_reshape": lambda h: torch.reshape(h, (3, -1, 2)),
    "unflatten": lambda h: h.unflatten(1, (2, 2)),
    "transpose": lambda h: h.transpose(1, 3),
    "transpose_neg": lambda h: torch.transpose(h, -1, -2),
    "t": lambda h: h.flatten(1).t() * 2.0 + torch.t(h.flatten(1)),
    "swapaxes": lambda h: torch.swapaxes(h, 1, 3) + h.swapdims(3, 1),
    "permute": lambda h: h.permute(0, 3, 1, 2),
    "permute_tuple": lambda h: torch.permute(h, (0, 2, 3, 1)),
    "contiguous": lambda h: h.transpose(1, 2).contiguous(),
    "clone": lambda h: h.clone(),
    "squeeze": lambda h: h[:, :1].squeeze(1),
    "squeeze_all": lambda h: h[:, :, :1].squeeze(),
    "unsqueeze": lambda h: h.unsqueeze(2),
    "unsqueeze_neg": lambda h: torch.unsqueeze(h, -1),
    "cat": lambda h: torch.cat([h, 2 * h[:, :2]], dim=1),
    "cat_last": lambda h: torch.cat((h[..., :1], h.sigmoid(), h), -1),
    "split": lambda h: h.split(1, dim=1)[0] - h.split(1, dim=1)[3] + torch.split(h, 1, 1)[2],
    "split_sections": lambda h: h.split([1, 3], 1)[1] * 2,
    "split_unused": lambda h: torch.split(h, 2, dim=3)[0],
    "chunk": lambda h: torch.cat([h.chunk(2, dim=1)[1], h.chunk(2, dim=1)[0]], 1),
    "chunk_unused": lambda h: h.chunk(3, dim=-1)[2],
    "index": lambda h: h[:, 1],
    "index_slices": lambda h: h[:, 1:3, ::2, -1],
    "index_none": lambda h: h[:, None, 2:],
    "index_ellipsis": lambda h: h[..., 0],
    "index_batch": lambda h: h[1:],
    "identity": nn.Identity(),
    "expand": lambda h: h[:, :, :1].expand(-1, 4, 2, 3),
    "expand_front": lambda h: h[:, :1].expand(2, 3, 4, 2, 3),
    "expand_as": lambda h: h[..., :1].expand_as(h),
    "broadcast_to": lambda h: torch.broadcast_to(h[:, :1], (3, 4, 2, 3)),
    "broadcast_to_method": lambda h: h.sum(0).broadcast_to(3, 4, 2, 3),
    "repeat": lambda h: h.repeat(1, 2, 1, 3),
    "repeat_front": lambda h: h.repeat((2, 1, 2, 1, 1)),
    "tile": lambda h: torch.tile(h, (2, 3)),
    "tile_method": lambda h: h.tile((2, 1, 1, 1, 2)),
    "roll": lambda h: torch.roll(h, (1, -2), (1, 3)),
    "roll_method_flat": lambda h: h.roll(5),
    "flip": lambda h: torch.flip(h, [1, -1]),
    "flip_method": lambda h: h.flip(2, 3),
    "fliplr": lambda h: torch.fliplr(h),
    "flipud": lambda h: h.flipud(),
    "unbind": lambda h: torch.unbind(h, 1)[0] * 2 + h.unbind(1)[3],
    "unbind_unused": lambda h: h.unbind(-1)[1],
    "stack": lambda h: torch.stack([h, h.sigmoid()], 2),
    "stack_neg": lambda h: torch.stack((h.sigmoid(), h), dim=-1),
    "T": lambda h: h.flatten(1).T,
    "mT": lambda h: h.mT,
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_ops_are_exact(name):
    fn = STRUCTURAL[name]
    model = Lambda(fn) if not isinstance(fn, nn.Module) else nn.Sequential(nn.Tanh(), fn)
    assert_exact(model.double(), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(4)), st.integers(0, 3), st.integers(0, 3), st.integers(1, 3))
def test_random_permutes_transposes_and_splits(perm, d0, d1, size):
    """Pieces of a split along d0, concatenated back in reverse order."""
    moved = [SHAPE[p] for p in perm]
    moved[d0], moved[d1] = moved[d1], moved[d0]
    count = -(-moved[d0] // size)

    def fn(h):
        parts = h.permute(*perm).transpose(d0, d1).split(size, dim=d0)
        return torch.cat([parts[i] for i in reversed(range(count))], dim=d0)
    assert_exact(Lambda(fn), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@st.composite
def broadcast_shapes(draw):
    """A full shape and a shape that broadcasts to it (dims dropped from the front or set to 1)."""
    full = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    keep = draw(st.integers(0, len(full)))
    small = tuple(1 if draw(st.booleans()) else s for s in full[len(full) - keep:])
    return full, small


class TwoActive(nn.Module):
    """add/sub of two activations of different (broadcasting) shapes, with alpha: ``b`` is x summed
    down to ``small`` (size-1 dims kept, leading dims dropped, the batch dim included)."""

    def __init__(self, full, small, how, alpha, swap):
        super().__init__()
        ones = tuple(1 + len(full) - len(small) + i for i, s in enumerate(small) if s == 1)
        self.ones, self.lead = ones, tuple(range(1 + len(full) - len(small)))
        self.how, self.alpha, self.swap = how, alpha, swap

    def forward(self, x):
        a = torch.tanh(x)
        b = torch.sigmoid(x)
        if self.ones:
            b = b.sum(self.ones, keepdim=True)
        b = b.sum(self.lead)
        first, second = (b, a) if self.swap else (a, b)
        if self.alpha == 1:
            return first + second if self.how == "add" else first - second
        return (torch.add if self.how == "add" else torch.sub)(first, second, alpha=self.alpha)


@settings(max_examples=30, deadline=None)
@given(broadcast_shapes(), st.sampled_from(["add", "sub"]), st.sampled_from([1, 2.5, -0.5]), st.booleans())
def test_add_sub_broadcast_and_alpha(shapes, how, alpha, swap):
    full, small = shapes
    x = torch.randn(2, *full, dtype=torch.float64)
    assert_exact(TwoActive(full, small, how, alpha, swap), x, units="op")


class Constants(nn.Module):
    """mul/div by numbers, by a buffer, by a non-active tensor and by a parameter; neg; in-place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(4) + 0.5)
        self.gain = nn.Parameter(torch.rand(3, 4) + 0.5)

    def forward(self, x):
        h = torch.tanh(x)
        a = h * 3.0 + 2.0 * h - h / 4.0
        b = torch.mul(h, self.scale) / self.scale.sum()
        c = torch.div(h, self.gain) * self.scale.sum()
        d = -h.mul(torch.ones(4, dtype=x.dtype) * 2)
        e = torch.neg(h).div(2.0)
        f = h * 1.0
        f *= 3.0
        f /= 2.0
        return a + b + c + d + e + f


def test_mul_div_by_constants_and_neg():
    model = Constants().double()
    assert_exact(model, torch.randn(5, 3, 4, dtype=torch.float64), units="op")


def test_parameter_through_a_computed_value_gets_its_gradient():
    """``x * self.g.sum()``: the factor is computed from a parameter; error mode gives ``g`` its exact
    gradient (it used to be dropped with a warning)."""
    class Derived(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.rand(3))

        def forward(self, x):
            return torch.tanh(x) * self.g.sum()

    input_rel, param_rel = compare_with_autograd(Derived().double(), torch.randn(2, 3, dtype=torch.float64))
    assert input_rel < TOL and param_rel < TOL


def test_add_of_a_parameter_gets_its_gradient():
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3, 4))

        def forward(self, x):
            return torch.tanh(x + self.pos) - torch.sub(x, self.pos, alpha=2)

    assert_exact(Offset().double(), torch.randn(2, 3, 4, dtype=torch.float64))


DROPOUT_SHAPES = [(nn.Dropout, (4, 6)), (nn.Dropout1d, (4, 3, 5)), (nn.Dropout2d, (4, 3, 2, 2)),
                  (nn.Dropout3d, (4, 3, 2, 2, 2))]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("cls,shape", DROPOUT_SHAPES)
@pytest.mark.parametrize("train", [True, False])
def test_dropout_reuses_its_mask(cls, shape, train, frontend):
    model = nn.Sequential(nn.Tanh(), cls(0.5)).double().train(train)
    x = torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, name


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("cls,shape", DROPOUT_SHAPES[1:])
def test_channel_dropout_in_train_mode_draws_autograds_mask(cls, shape, frontend):
    """With the same seed the compiled forward draws the model's own channel mask (ATen's
    feature_dropout under torch.export), so the gradients equal autograd's."""
    model = nn.Sequential(nn.Conv1d(shape[1], 3, 1) if len(shape) == 3 else nn.Identity(), nn.Tanh(),
                          cls(0.5), nn.Flatten(), nn.Linear(math.prod(shape[1:]), 2)).double().train()
    x = torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    error = torch.randn(shape[0], 2, dtype=torch.float64)
    assert_equals_autograd_under_one_seed(model, program, x, error, seed=7)


def test_fanout_sums_feedback():
    """A value used four times receives the sum of its four feedbacks."""
    model = Lambda(lambda h: torch.cat([h, h.transpose(0, 1)], 1) + torch.cat([h, 2 * h], 1))
    x = torch.randn(3, 3, dtype=torch.float64)
    assert_exact(model, x, units="op")


def test_stack_of_a_tuple_value():
    """``torch.stack(h.unbind(1), -1)`` passes the tuple itself (one graph value) as ``tensors``."""
    model = Lambda(lambda h: torch.stack(h.unbind(1), -1) * 2.0)
    input_rel, _ = compare_with_autograd(model, torch.randn(*SHAPE, dtype=torch.float64))
    assert input_rel < TOL


def assert_dtp_is_bp(model, x, classes):
    """Every parameter's gradient: error mode == autograd, and analytic DTP with beta = 1e-6 points
    the same way as BP (angle < 0.01 degrees), float64."""
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL
    program = fbcompile.compile(model, x)
    y = torch.randint(0, classes, (x.shape[0],))
    bp = step_grads(fbcompile.learner(program, "bp"), model, x, y)
    dtp = step_grads(fbcompile.learner(program, "dtp", beta=1e-6), model, x, y)
    for name, grad in bp.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert angle(dtp[name], grad) < 0.01, (name, angle(dtp[name], grad))


class Sandwich(nn.Module):
    """Linear -> tanh -> op -> flatten -> Linear: the op's feedback reaches both layers' parameters."""

    def __init__(self, fn, shape, classes=3):
        super().__init__()
        self.first, self.fn = nn.Linear(shape[-1], shape[-1]), fn
        self.last = nn.Linear(fn(torch.zeros(shape))[0].numel(), classes)

    def forward(self, x):
        return self.last(self.fn(torch.tanh(self.first(x))).flatten(1))


COPIES_AND_PERMUTATIONS = ["expand", "expand_as", "broadcast_to", "repeat", "tile", "roll", "roll_method_flat",
                           "flip", "fliplr", "unbind", "stack", "mT"]


@pytest.mark.parametrize("name", COPIES_AND_PERMUTATIONS)
def test_copies_and_permutations_feed_linears_and_dtp_is_bp(name):
    x = torch.randn(*SHAPE, dtype=torch.float64)
    assert_dtp_is_bp(Sandwich(STRUCTURAL[name], SHAPE).double(), x, 3)


@pytest.mark.parametrize("name", ["expand", "expand_front", "repeat", "repeat_front", "tile", "broadcast_to"])
def test_copies_pinv_is_mean_over_copies(name):
    assert_condition(Fn(STRUCTURAL[name]), torch.randn(*SHAPE, dtype=torch.float64), "P")


@pytest.mark.parametrize("name", ["roll", "roll_method_flat", "flip", "flip_method", "fliplr", "flipud", "stack",
                                  "mT", "T"])
def test_permutations_are_their_own_inverse_and_pinv(name):
    x = torch.randn(*SHAPE, dtype=torch.float64)
    model = Fn(lambda h: STRUCTURAL[name](torch.tanh(h)))
    assert_condition(model, x, "I", nodes=[n for n in _rule_nodes(model, x, "I") if not n.startswith("tanh")])
    assert_condition(Fn(STRUCTURAL[name]), x, "P")


def _rule_nodes(model, x, condition):
    return [n.name for n in fbcompile.compile(model.double(), x, condition=condition).rules]


def test_copies_refuse_condition_i_unless_nothing_is_copied():
    x = torch.randn(*SHAPE, dtype=torch.float64)
    with pytest.raises(UnsupportedOpError, match=r"repeat maps 72 entries to 432, so it has no inverse"):
        fbcompile.compile(Fn(STRUCTURAL["repeat"]), x, condition="I")
    assert_condition(Fn(lambda h: h.expand(3, 4, 2, 3) * 2.0), x, "I")


def test_unsupported_attributes_are_refused_with_the_name():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedOpError, match=r"tensor attribute 'data' has no feedback rule"):
        fbcompile.compile(Fn(lambda h: h.data * h), x)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=4, max_size=6), st.integers(1, 3), st.booleans())
def test_random_repeats_tiles_and_expands(reps, size, tile):
    """repeat/tile with random counts (extra leading dims too), expand of a size-1 dim to ``size``."""
    rank = len(SHAPE)
    reps = [1] + reps[1:] if len(reps) == rank else reps

    used = tuple(reps[1:]) if tile else tuple(reps)

    def fn(h):
        copied = torch.tile(h, used) if tile else h.repeat(*used)
        return copied[..., :1].expand(*[-1] * (max(len(used), rank) - 1), size)
    assert_exact(Lambda(fn), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 3)), min_size=1, max_size=3, unique_by=lambda p: p[1]),
       st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True), st.integers(0, 3))
def test_random_rolls_flips_and_stacks(shift_dims, flip_dims, stack_dim):
    shifts, dims = zip(*shift_dims)

    def fn(h):
        moved = torch.roll(h, shifts, dims).flip(flip_dims)
        parts = moved.unbind(stack_dim)
        return torch.stack([parts[i] for i in reversed(range(SHAPE[stack_dim]))], dim=stack_dim)
    assert_exact(Lambda(fn), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@pytest.mark.parametrize("name", ["tile", "tile_method"])
def test_tile_through_torch_export_equals_autograd(name):
    from test_rules_elementwise import assert_matches_autograd
    model = Sandwich(STRUCTURAL[name], SHAPE).double()
    assert_matches_autograd(model, torch.randn(*SHAPE, dtype=torch.float64), "export", ops=["tile"])


@pytest.mark.parametrize("name", ["mT", "T", "t", "broadcast_to"])
def test_transposes_and_broadcasts_are_exact_under_export(name):
    """ATen's mT / numpy_T / t / broadcast_to spellings bind to the same rules as torch.fx's."""
    from test_rules_elementwise import assert_matches_autograd
    model = Sandwich(STRUCTURAL[name], SHAPE).double()
    assert_matches_autograd(model, torch.randn(*SHAPE, dtype=torch.float64), "export")
