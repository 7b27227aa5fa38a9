"""Selection rules (float64): x[idx] with basic and advanced indices, select, narrow, gather,
index_select, pad (all modes, function and modules), where, masked_fill, max/min/amax/amin; T exact
against autograd with the adjoint identity, P against pinv of the dense Jacobian, I refused, each op
feeding Linears with analytic DTP (beta -> 0) equal to BP."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.errors import UnsupportedOpError

from test_conditions import Fn, assert_condition
from test_rules_structural import Lambda, Sandwich, assert_dtp_is_bp, assert_exact

SHAPE = (2, 3, 4, 5)
torch.manual_seed(11)
IDX = torch.tensor([0, 2, 2, -1])                       # repeats and a negative index
ROWS = torch.tensor([[1, 0], [2, 2], [2, -3]])
GATHER_IDX = torch.randint(0, 4, (2, 3, 6, 5))           # more rows than the input has: repeats
MASK = torch.rand(4, 5) > 0.5
CONDITION = torch.rand(3, 4, 5) > 0.5
TIES = torch.tensor([[0.5, -1.0, 0.5, 0.25], [2.0, 2.0, 2.0, -3.0], [0.0, -1.0, -2.0, -3.0]], dtype=torch.float64)


class Buffered(nn.Module):
    """Indices, a mask and a condition held as buffers (get_attr nodes in the traced graph)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("idx", IDX.clone())
        self.register_buffer("mask", MASK.clone())
        self.register_buffer("condition", CONDITION.clone())

    def forward(self, x):
        return self.fn(self, torch.tanh(x))


SELECTIONS = {
    "int": lambda h: h[:, 1],
    "negative_int": lambda h: h[-1, :, -2],
    "steps": lambda h: h[:, 1::2, ::3, -4:],
    "runtime_slice": lambda h: h[..., : h.shape[-1] // 2] * h[..., h.size(-1) - 2:h.size(-1) - 2 + h.shape[-1] // 2],
    "none_ellipsis": lambda h: h[None, ..., None, 2],
    "tensor": lambda h: h[:, IDX],
    "tensor_after_ellipsis": lambda h: h[..., IDX],
    "list": lambda h: h[:, [2, 0, 0]],
    "two_adjacent_tensors": lambda h: h[:, ROWS, IDX[:2]],
    "separated_tensors": lambda h: h[:, IDX[:3], 1:, ROWS[:, 0]],
    "bool_mask": lambda h: h[:, :, MASK],
    "batch_tensor": lambda h: h[IDX[:3] % 2],
    "select": lambda h: h.select(2, -1),
    "torch_select": lambda h: torch.select(h, 1, 2),
    "narrow": lambda h: torch.narrow(h, 3, 1, 4),
    "narrow_negative": lambda h: h.narrow(-2, -3, 2),
    "gather": lambda h: torch.gather(h, 2, GATHER_IDX),
    "gather_method": lambda h: h.gather(-1, GATHER_IDX[..., :3].transpose(-1, -2).contiguous()),
    "index_select": lambda h: torch.index_select(h, 1, IDX % 3),
    "index_select_method": lambda h: h.index_select(-1, IDX[:3] % 5),
    "pad_constant": lambda h: F.pad(h, (1, 2, 0, 3), value=0.5),
    "pad_negative": lambda h: F.pad(h, (-1, 2, 1, -2)),
    "pad_reflect": lambda h: F.pad(h, (2, 1, 3, 0), mode="reflect"),
    "pad_replicate": lambda h: F.pad(h, (2, 3, 1, 1), "replicate"),
    "pad_circular": lambda h: F.pad(h, (2, 1, 1, 3), mode="circular"),
    "zero_pad_module": nn.ZeroPad2d((1, 0, 2, 1)),
    "constant_pad_module": nn.ConstantPad1d(2, -0.5),
    "reflection_pad_module": nn.ReflectionPad2d(2),
    "replication_pad_module": nn.ReplicationPad2d((0, 3, 1, 0)),
    "circular_pad_module": nn.CircularPad2d((1, 2, 0, 1)),
    "where": lambda h: torch.where(CONDITION, h, h.sigmoid()),
    "where_scalar": lambda h: torch.where(CONDITION, -0.3, h),
    "where_broadcast": lambda h: torch.where(CONDITION, h[:, :1], h.sigmoid()[..., :1]),
    "where_method": lambda h: h.where(CONDITION, h.sigmoid()),
    "masked_fill": lambda h: h.masked_fill(MASK, -1.0),
    "torch_masked_fill": lambda h: torch.masked_fill(h, MASK, 2.0),
    "masked_fill_active_value": lambda h: h.masked_fill(MASK, h.mean()),
    "max_dim": lambda h: h.max(1)[0],
    "max_keepdim": lambda h: torch.max(h, -1, keepdim=True)[0],
    "min_dim": lambda h: h.min(dim=2)[0] * 2.0,
    "amax": lambda h: h.amax((1, 3)),
    "amin_keepdim": lambda h: torch.amin(h, -1, keepdim=True),
    "max_all": lambda h: h - h.max(),
    "min_all": lambda h: torch.min(h) + h,
}


def unpacked_max(h):
    values, indices = torch.max(h, 2)
    return values


SELECTIONS["max_unpacked"] = unpacked_max
BUFFERED = {
    "tensor_buffer": lambda self, h: h[:, :, self.idx % 4],
    "gather_buffer": lambda self, h: h.gather(1, self.idx[:3].reshape(1, 3, 1, 1).expand(2, 3, 4, 5) % 3),
    "where_buffer": lambda self, h: torch.where(self.condition, h.sigmoid(), h),
    "masked_fill_buffer": lambda self, h: h.masked_fill(self.mask, 0.0),
    "masked_fill_inplace": lambda self, h: (h * 2.0).masked_fill_(self.mask, 1.0),
}


def _model(name):
    if name in BUFFERED:
        return Buffered(BUFFERED[name])
    fn = SELECTIONS[name]
    return Lambda(fn) if not isinstance(fn, nn.Module) else nn.Sequential(nn.Tanh(), fn)


@pytest.mark.parametrize("name", sorted(SELECTIONS) + sorted(BUFFERED))
def test_selections_are_exact(name):
    assert_exact(_model(name).double(), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@pytest.mark.parametrize("op", ["amax", "max_all", "amin", "min_all"])
def test_ties_split_evenly_like_autograd(op):
    """amax/amin and whole-tensor max/min share the feedback among equal entries (autograd's even split)."""
    fns = {"amax": lambda h: h.amax(1), "amin": lambda h: torch.amin(h, 0, keepdim=True),
           "max_all": lambda h: h.max() * torch.ones(2, dtype=h.dtype), "min_all": lambda h: h.min()[None]}
    model = Fn(fns[op])
    assert_exact(model, TIES.clone(), units="op")
    assert_condition(model, TIES.clone(), "P")


P_CASES = ["steps", "two_adjacent_tensors", "bool_mask", "narrow_negative", "gather", "index_select", "pad_negative",
           "pad_reflect", "pad_circular", "where_broadcast", "masked_fill_active_value", "max_dim", "amax"]


@pytest.mark.parametrize("name", P_CASES)
def test_pinv_is_transpose_over_counts(name):
    """J^+ = diag(1/c) J^T (c = J^T 1) equals torch.linalg.pinv of the dense Jacobian."""
    assert_condition(Fn(SELECTIONS[name]), torch.randn(*SHAPE, dtype=torch.float64), "P")


@pytest.mark.parametrize("name,op", [("tensor", "index"), ("select", "select"), ("gather", "gather"),
                                     ("pad_reflect", "pad"), ("where", "where"), ("masked_fill", "masked_fill"),
                                     ("max_dim", "max"), ("amax", "amax")])
def test_condition_i_is_refused_with_the_reason(name, op):
    with pytest.raises(UnsupportedOpError, match=rf"\(op '{op}'\): {op} (selects|drops) entries.*no inverse"):
        fbcompile.compile(Fn(SELECTIONS[name]).double(), torch.randn(*SHAPE, dtype=torch.float64), condition="I")


@pytest.mark.parametrize("fn,message", [
    (lambda h: torch.max(h, h.dim() - 1).values, r"argument 'dim' of torch.max is a run-time value"),
    (lambda h: torch.narrow(h, 1, h.size(2) - 4, 2), "argument 'start' of narrow is a run-time value"),
    (lambda h: F.pad(h, (1, 1), mode="bogus"), None),
], ids=["runtime_max_dim", "runtime_narrow", "bad_mode"])
def test_unsupported_calls_are_refused_by_name(fn, message):
    x = torch.randn(*SHAPE, dtype=torch.float64)
    if message is None:
        with pytest.raises(fbcompile.FBCompileError, match="bogus"):
            fbcompile.compile(Fn(fn), x)
        return
    with pytest.raises(UnsupportedOpError, match=message):
        fbcompile.compile(Fn(fn), x)


FEEDING = ["steps", "runtime_slice", "two_adjacent_tensors", "bool_mask", "select", "narrow", "gather", "index_select", "pad_reflect",
           "replication_pad_module", "where", "masked_fill", "max_unpacked", "amin_keepdim"]


@pytest.mark.parametrize("name", FEEDING)
def test_selections_feed_linears_and_dtp_is_bp(name):
    x = torch.randn(*SHAPE, dtype=torch.float64)
    assert_dtp_is_bp(Sandwich(SELECTIONS[name], SHAPE).double(), x, 3)


# -- property tests -----------------------------------------------------------------------------------
@st.composite
def index_expressions(draw):
    """A shape (batch first) and an index mixing ints (negative too), slices with steps, None,
    an Ellipsis and up to two integer tensors (with repeats and negative entries)."""
    shape = tuple(draw(st.integers(2, 4)) for _ in range(draw(st.integers(2, 4))))
    items, tensors = [], 0
    for size in shape:
        kind = draw(st.sampled_from(["all", "int", "slice", "tensor", "none"]))
        if kind == "none":
            items.append(None)
            kind = "all"
        if kind == "all":
            items.append(slice(None))
        elif kind == "int":
            items.append(draw(st.integers(-size, size - 1)))
        elif kind == "slice":
            start, stop = draw(st.integers(-size, size - 1)), draw(st.one_of(st.none(), st.integers(-size, size)))
            items.append(slice(start, stop, draw(st.integers(1, 3))))
        elif tensors < 2:
            tensors += 1
            items.append(torch.tensor(draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=4))))
        else:
            items.append(slice(None))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(items)))
        items = [Ellipsis] + items[cut:]
    return shape, tuple(items)


@settings(max_examples=25, deadline=None)
@given(index_expressions())
def test_random_indexing_is_exact(case):
    shape, idx = case
    x = torch.randn(*shape, dtype=torch.float64)
    try:
        out = x[idx]
    except IndexError:          # broadcasting two index tensors of different lengths
        assume(False)
    assume(out.numel() > 0)
    assert_exact(Lambda(lambda h: h[idx]), x, units="op")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 3), st.integers(1, 7), st.booleans(), st.data())
def test_random_gathers_and_index_selects(dim, length, use_gather, data):
    size = SHAPE[dim]
    if use_gather:
        shape = tuple(length if d == dim else s for d, s in enumerate(SHAPE))
        count = math.prod(shape)
        index = torch.tensor(data.draw(st.lists(st.integers(0, size - 1), min_size=count, max_size=count)))
        index = index.reshape(shape)
        fn = lambda h: h.gather(dim, index)
    else:
        index = torch.tensor(data.draw(st.lists(st.integers(-size, size - 1), min_size=length, max_size=length)))
        fn = lambda h: torch.index_select(h, dim, index % size)
    assert_exact(Lambda(fn), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["constant", "reflect", "replicate", "circular"]), st.integers(1, 2), st.data())
def test_random_pads(mode, n, data):
    """Pads of the last n dims (negative ones too in constant mode), each below the padded size."""
    low = -1 if mode == "constant" else 0
    pads = tuple(data.draw(st.integers(low, min(SHAPE[-1 - i // 2] - 1, 3))) for i in range(2 * n))
    fn = (lambda h: F.pad(h, pads, mode=mode)) if n == 2 else (lambda h: F.pad(h.flatten(0, 1), pads, mode=mode))
    assert_exact(Lambda(fn), torch.randn(*SHAPE, dtype=torch.float64), units="op")


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["max", "min", "amax", "amin"]), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
       st.booleans(), st.booleans())
def test_random_extremes_with_ties(op, dims, keepdim, ties):
    """Over random dims, on inputs with many equal entries when ``ties`` (values from {-1, 0, 1})."""
    x = torch.randint(-1, 2, SHAPE).double() if ties else torch.randn(*SHAPE, dtype=torch.float64)
    if op in ("max", "min"):
        fn = lambda h: getattr(h, op)(dims[0], keepdim=keepdim)[0]
    else:
        fn = lambda h: getattr(torch, op)(h, dims, keepdim=keepdim)
    assert_exact(Fn(fn), x, units="op")


def test_indices_of_max_drive_a_gather():
    """``values, indices = h.max(1)``: the values get feedback, the integer indices pick what a later
    gather reads and get none."""
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.out = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(x)
            values, indices = h.max(1)
            return self.out(self.mix(h).gather(1, indices[:, None].expand(-1, 5))) + values[:, None]

    assert_exact(Routed().double(), torch.randn(4, 5, dtype=torch.float64))
