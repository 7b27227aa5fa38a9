"""In-place writes (fbcompile.mutation): later reads of a written tensor follow the write, or the
model is refused; torch.export makes writes through views functional. Each model here was silently
wrong before (gradients 7% to 180% off autograd)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from helpers import compare_with_autograd, randomise_vectors

FRONTENDS = ["fx", "export"]


class Writes(nn.Module):
    """Two Linear layers and a forward given as a function of (self, x)."""

    def __init__(self, forward):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)
        self.relu = nn.ReLU(inplace=True)
        self.body = forward

    def forward(self, x):
        return self.body(self, x)


def _unassigned_relu(m, x):
    h = m.a(x)
    h.relu_()
    return h * 2


def _result_and_tensor_both_read(m, x):
    h = m.a(x)
    r = h.tanh_()
    return r + h * m.b(x)


def _inplace_module_result_dropped(m, x):
    h = m.a(x)
    m.relu(h)
    return h * m.b(x)


def _masked_fill_unassigned(m, x):
    h = m.a(x)
    h.masked_fill_(x[:, :4] > 0, 0.5)
    return h * 3


def _columns_written_other_columns_read(m, x):
    h = torch.cat([m.a(x), m.b(x)], 1)
    first, second = h[:, :4], h[:, 4:]        # rows interleave in memory; no element is shared
    first.mul_(3)
    return first + second


def _mask_by_item_assignment(m, x):          # torch.fx cannot trace item assignment to a proxy
    mask = x.new_zeros(4)
    mask[1:3] = 1.0
    return m.a(x) * mask


FOLLOWED = {"unassigned relu_": (_unassigned_relu, FRONTENDS),
            "tanh_ result and tensor both read": (_result_and_tensor_both_read, FRONTENDS),
            "nn.ReLU(inplace=True) result dropped": (_inplace_module_result_dropped, FRONTENDS),
            "masked_fill_ unassigned": (_masked_fill_unassigned, FRONTENDS),
            "some columns written, others read": (_columns_written_other_columns_read, FRONTENDS),
            "constant mask filled by item assignment": (_mask_by_item_assignment, ["export"])}


@pytest.mark.parametrize("case", FOLLOWED)
def test_writes_the_graph_can_follow_give_autograds_gradients(case):
    body, frontends = FOLLOWED[case]
    for frontend in frontends:
        model = Writes(body).double()
        x = torch.randn(5, 6, dtype=torch.float64)
        program = fbcompile.compile(model, x, frontend=frontend)
        input_error, param_error = compare_with_autograd(model, x, program=program)
        assert input_error < 1e-12 and param_error < 1e-12, (case, frontend, input_error, param_error)


def test_an_in_place_dropout_whose_result_is_dropped_masks_what_is_read_in_train_mode():
    def body(m, x):
        h = m.a(x)
        F.dropout(h, 0.5, m.training, inplace=True)
        return h * m.b(x)
    model = Writes(body).double().train()
    x = torch.randn(5, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="fx")
    error = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(3)
    out = model(x)
    assert (out == 0).any() and (out != 0).any()      # the dropout mask is real
    torch.autograd.backward(out, error)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    program.propagate_error(x, error)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-12, atol=1e-14), name


def _slice_written(m, x):
    h = m.a(x).clone()
    h[:, :2].mul_(2)
    return h


def _view_written(m, x):
    h = m.a(x)
    h.view(5, 2, 2).add_(1)
    return h * m.b(x)


def _transpose_written(m, x):
    h = m.a(x)
    h.t().mul_(3)
    return h


def _item_assigned(m, x):
    h = m.a(x).clone()
    h[:, 0] = m.b(x)[:, 1]
    return h


def _slice_zeroed(m, x):
    h = m.a(x).clone()
    h[:, 1:].zero_()
    return h


THROUGH_VIEWS = {"slice written by mul_": _slice_written, "view written by add_": _view_written,
                 "transpose written": _transpose_written, "item assignment": _item_assigned,
                 "slice zeroed": _slice_zeroed}


@pytest.mark.parametrize("case", sorted(set(THROUGH_VIEWS) - {"item assignment"}))    # fx cannot trace that one
def test_torch_fx_refuses_writes_through_views_naming_the_write(case):
    model = Writes(THROUGH_VIEWS[case]).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(FBCompileError, match=r"(?s)in place, and .* is read afterwards by .*out of place"):
        fbcompile.compile(model, x, frontend="fx")


@pytest.mark.parametrize("frontend", ["export", "auto"])
@pytest.mark.parametrize("case", THROUGH_VIEWS)
def test_torch_export_makes_writes_through_views_functional_and_exact(case, frontend):
    """The exported program is made functional (slice_scatter, select_scatter, copy, zero): every
    rule exact and the gradients autograd's ("auto" falls back to export from fx's refusal)."""
    from test_rules_elementwise import assert_matches_autograd
    model = Writes(THROUGH_VIEWS[case]).double()
    program = assert_matches_autograd(model, torch.randn(5, 6, dtype=torch.float64), frontend)
    assert program.traced.meta["fbcompile_frontend"][0] == "export"


class NormalisedThenWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.norm(self.a(x))
        h[:, :2].mul_(2)
        return h


def test_a_write_through_a_view_beside_a_batch_norm_is_still_refused_naming_the_write():
    """A functional BatchNorm has no mapping back to the module: that program keeps its writes."""
    with pytest.raises(FBCompileError, match="is read afterwards"):
        fbcompile.compile(NormalisedThenWritten().double(), torch.randn(5, 6, dtype=torch.float64), frontend="export")


@pytest.mark.parametrize("algorithm", ["mf", "dfa", "drtp", "ddtp-linear", "mf-dd"])
def test_learners_that_differentiate_the_forward_train_an_exported_item_assignment(algorithm):
    """torch.export writes ``h[:, 0] = v`` as ``aten.copy``, which autograd cannot differentiate: the
    forward programs call the op's own (differentiable) form, so Mono-Forward's local losses reach
    through it. ``v`` is one number per sample: its direct projection is a vector (C,). Every
    parameter gets a finite, nonzero update (before: mf raised autograd's "derivative for aten::copy
    is not implemented", the direct learners an IndexError drawing that projection)."""
    model = Writes(_item_assigned).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 3])
    learner = fbcompile.learner(fbcompile.compile(model, x, frontend="export"), algorithm, seed=1)
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name
        assert float(param.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("algorithm", ["dfa", "drtp"])
def test_a_projection_onto_one_number_per_sample_is_the_signal_pulled_back(algorithm):
    """The exported item assignment ``h = a(x).clone(); h[:, 0] = b(x)[:, 1]``: the unit of ``a`` has
    three outputs, ``clone`` (h), ``select_1`` (h[:, 0], one number per sample: its B is a vector
    (C,)) and ``slice_3`` (h); a's update is sum_u <value_u, s B_u> differentiated, b's (the output
    unit) <b(x)[:, 1], e[:, 0]>."""
    model = randomise_vectors(Writes(_item_assigned).double())
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 3])
    learner = fbcompile.learner(fbcompile.compile(model, x, frontend="export"), algorithm, seed=2)
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    with torch.no_grad():
        error = (torch.softmax(model(x), 1) - F.one_hot(y, 4)) / len(x)
        signal = error if algorithm == "dfa" else -F.one_hot(y, 4).double() / len(x)
    h = model.a(x)
    values = {"clone": h, "select_1": h[:, 0], "slice_3": h}
    assert [(p.node, p.shape) for p in learner.plan.projections] == [("clone", (4,)), ("select_1", ()),
                                                                     ("slice_3", (4,))]
    local = sum((values[p.node] * (signal @ B.reshape(4, -1)).reshape(values[p.node].shape)).sum()
                for p, B in zip(learner.plan.projections, learner.projections.weights))
    expected = torch.autograd.grad(local, [model.a.weight, model.a.bias])
    expected += torch.autograd.grad((model.b(x)[:, 1] * error[:, 0]).sum(), [model.b.weight, model.b.bias])
    for param, grad in zip([model.a.weight, model.a.bias, model.b.weight, model.b.bias], expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-14)
