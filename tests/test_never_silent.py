"""Nothing is dropped silently: tuple elements by negative index or slice, recurrent modules (refused
by torch.fx, unrolled by torch.export), parameters reached through computed values, optional forward
arguments, integer inputs, and the compile-time check that the feedback graph trains exactly the parameters autograd reaches."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError, UnsupportedOpError
from fbcompile.passes.reach import check_parameter_coverage

from helpers import compare_with_autograd

TOL = 1e-10


class Res2NetSplit(nn.Module):
    """Res2Net's hierarchical split: the last chunk is read as spx[-1] (or spx[3])."""

    def __init__(self, negative=True):
        super().__init__()
        self.negative = negative
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(3))
        self.head = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x):
        spx = torch.split(torch.relu(self.conv1(x)), 2, 1)
        outs, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = torch.tanh(conv(sp))
            outs.append(sp)
        last = spx[-1] if self.negative else spx[3]
        return self.head(torch.cat([*outs, last], 1).flatten(1))


@pytest.mark.parametrize("negative", [True, False])
def test_negative_tuple_index_routes_feedback_to_the_right_element(negative):
    model, x = Res2NetSplit(negative).double(), torch.randn(3, 3, 5, 5, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


class TupleSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(6, 3)

    def forward(self, x):
        parts = torch.tanh(self.a(x)).split(2, 1)
        rest = parts[1:]
        return self.b(torch.cat([rest[0], rest[-1], parts[-2]], 1))


def test_slices_of_a_tuple_keep_their_element_positions():
    model, x = TupleSlice().double(), torch.randn(4, 5, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


class WholeTuple(nn.Module):
    """A tuple value (or a slice of one, any step) passed whole to ``torch.cat``."""

    def __init__(self, select, kept):
        super().__init__()
        self.select, self.a, self.b = select, nn.Linear(5, 6), nn.Linear(2 * kept, 3)

    def forward(self, x):
        return self.b(torch.cat(self.select(torch.tanh(self.a(x)).chunk(3, 1)), 1))


@pytest.mark.parametrize("select, kept", [(lambda parts: parts, 3), (lambda parts: parts[::-1], 3),
                                          (lambda parts: parts[-1::-2], 2), (lambda parts: parts[2:0:-1], 2)],
                         ids=["whole", "reversed", "step_minus_2", "tail_reversed"])
def test_a_tuple_or_slice_of_one_passed_whole_to_cat_gets_exact_feedback(select, kept):
    model, x = WholeTuple(select, kept).double(), torch.randn(4, 5, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


@pytest.mark.parametrize("cell", [nn.LSTM(6, 5, batch_first=True, bidirectional=True), nn.GRU(6, 5, batch_first=True),
                                  nn.RNN(6, 5, batch_first=True)])
@pytest.mark.parametrize("residual", [False, True])
def test_recurrent_modules_are_refused_by_torch_fx_and_unrolled_by_torch_export(cell, residual):
    cell = copy.deepcopy(cell)      # the parametrised instance is shared; this test converts it to float64
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rnn = nn.Linear(6, 6), cell
            self.out = nn.Linear(cell.hidden_size * (2 if cell.bidirectional else 1), 6)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            y, _ = self.rnn(h)
            y = self.out(y)
            return y + h if residual else y

    model, x = Recurrent(), torch.randn(2, 4, 6)
    found = fbcompile.coverage(model, x, frontend="fx")
    assert [p.node for p in found] == ["rnn"]
    assert type(cell).__name__ in found[0].target and "frontend='export' or 'auto'" in found[0].reason
    with pytest.raises(UnsupportedOpError, match=type(cell).__name__):
        fbcompile.compile(model, x, frontend="fx")
    model, x = model.double(), x.double()
    input_rel, param_rel = compare_with_autograd(model, x, program=fbcompile.compile(model, x))
    assert input_rel < TOL and param_rel < TOL


class TokenModel(nn.Module):
    """A class token and a position embedding, both parameters reached through computed values."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.tied = nn.Parameter(torch.randn(8, 8) / 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        token = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([token, h], dim=1) + self.pos
        h = h * self.scale.view(1, 1, -1)
        h = torch.tanh(F.linear(h, self.tied.transpose(0, 1)))
        return self.head(h[:, 0])


def test_parameters_reached_through_computed_values_get_their_exact_gradient():
    model, x = TokenModel().double(), torch.randn(3, 4, 6, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


@pytest.mark.parametrize("algorithm", ["bp", "dtp", "tp", "drtp", "dfa", "mf"])
def test_parameter_paths_learn_under_every_learner(algorithm):
    model, x = TokenModel(), torch.randn(3, 4, 6)
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    model.zero_grad(set_to_none=True)
    learner.step(x, torch.randint(0, 3, (3,)), F.cross_entropy)
    assert model.cls_token.grad is not None and model.cls_token.grad.abs().sum() > 0


def test_feedback_weights_refuse_a_weight_computed_from_parameters():
    model, x = TokenModel(), torch.randn(3, 4, 6)
    with pytest.raises(FBCompileError, match="node\\(s\\) linear feed back through a weight with no feedback slot"):
        fbcompile.learner(fbcompile.compile(model, x), "fa")


def test_small_beta_dtp_equals_bp_through_parameter_paths():
    model, x, y = TokenModel().double(), torch.randn(3, 4, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    program = fbcompile.compile(model, x)
    grads = {}
    for name, options in (("bp", {}), ("dtp", {"beta": 1e-7})):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, name, **options).step(x, y, F.cross_entropy)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    cosine = F.cosine_similarity(grads["bp"], grads["dtp"], dim=0)
    assert cosine > 1 - 1e-10


class OptionalArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, attn_mask=None, is_causal=False, scale=1.0):
        y = self.fc(x)
        if attn_mask is not None:
            y = y + attn_mask
        if is_causal:
            y = y.flip(1)
        return y * scale


def test_optional_forward_arguments_take_their_defaults_or_given_constants():
    model, x = OptionalArguments().double(), torch.randn(2, 4, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL
    program = fbcompile.compile(model, x, kwargs={"scale": 2.5})
    assert len(program.inputs) == 1
    error = torch.randn(2, 3, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, error)
    assert torch.allclose(ours, 2.5 * error @ model.fc.weight)
    with pytest.raises(FBCompileError, match="no argument 'mask'"):
        fbcompile.compile(model, x, kwargs={"mask": None})
    with pytest.raises(FBCompileError, match="pass it as an example input"):
        fbcompile.compile(model, x, kwargs={"attn_mask": torch.zeros(2, 3)})


def test_a_required_argument_without_an_example_is_named():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(FBCompileError, match="'y' has no default"):
        fbcompile.compile(TwoInputs(), torch.randn(2, 3))


def test_integer_inputs_carry_no_feedback():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x, ids):
            return self.fc(torch.tanh(x + self.table[0]) * 1.5) + ids.double().sum() * 0

    x, ids = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 10, (3, 5))
    program = fbcompile.compile(Lookup().double(), (x, ids))
    assert [n.name for n in program.boundary if n.op == "placeholder"] == ["x"]


def test_the_check_names_a_parameter_the_feedback_graph_lost():
    model, x = TokenModel().double(), torch.randn(3, 4, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    written = [q for q in program.feedback["error"].params if q != "cls_token"]
    with pytest.raises(FBCompileError, match=r"1 parameter\(s\).*\n  cls_token: read at"):
        check_parameter_coverage(program.traced, model, written)


def test_named_tuple_fields_are_selects_of_their_position():
    class Extremes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x)).view(-1, 2, 3)
            return self.b(h.max(1).values + h.min(dim=1)[0])

    model, x = Extremes().double(), torch.randn(5, 4, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


@pytest.mark.parametrize("algorithm", ["dtp", "tp", "bp", "drtp", "mf"])
def test_a_tuple_read_whole_stays_inside_its_unit(algorithm):
    class StackSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x):
            parts = torch.tanh(self.a(x)).split(2, 1)
            return self.b(torch.stack(parts, 1).flatten(1))

    model, x = StackSplit(), torch.randn(4, 5)
    program = fbcompile.compile(model, x, units="op")
    model.zero_grad(set_to_none=True)
    fbcompile.learner(program, algorithm).step(x, torch.randint(0, 3, (4,)), F.cross_entropy)
    assert all(p.grad is not None for p in model.parameters())
