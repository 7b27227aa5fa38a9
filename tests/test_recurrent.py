"""Recurrent modules and cells, written step by step for torch.export (fbcompile/frontends/recurrent.py):
the unrolled forward equals the fused kernel in float64 for every option, compiled models equal
autograd (backprop through time) with every rule exact, other sequence lengths are refused before a
step, every learner steps, and the refusals name what is not supported."""
import itertools
import math

import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError, UnsupportedOpError
from fbcompile.frontends import frontend_of
from fbcompile.frontends.recurrent import cell_forward, unrolled_forward

from helpers import randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = list(itertools.product([nn.LSTM, nn.GRU, nn.RNN], [1, 2], [False, True], [False, True], [True, False]))


def _flat(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("cls, layers, bidirectional, batch_first, bias", OPTIONS,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_the_unrolled_forward_equals_the_module(cls, layers, bidirectional, batch_first, bias):
    torch.manual_seed(0)
    extra = {"nonlinearity": "relu"} if cls is nn.RNN and bias else {}
    module = cls(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                 **extra).double()
    x = torch.randn(*((2, 6, 4) if batch_first else (6, 2, 4)), dtype=torch.float64)
    directions = 2 if bidirectional else 1
    h0 = torch.randn(layers * directions, 2, 5, dtype=torch.float64)
    for hx in (None, (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0):
        for ours, theirs in zip(_flat(unrolled_forward(module, x, hx)), _flat(module(x, hx))):
            assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=0, atol=1e-14)


def test_lstm_projections_and_unbatched_inputs_equal_the_module():
    torch.manual_seed(0)
    module = nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    for ours, theirs in zip(_flat(unrolled_forward(module, x)), _flat(module(x))):
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cell", [nn.LSTMCell(4, 5), nn.GRUCell(4, 5, bias=False), nn.RNNCell(4, 5, nonlinearity="relu")],
                         ids=lambda m: type(m).__name__)
def test_cells_equal_the_module(cell):
    cell = cell.double()
    for x in (torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)):
        ours, theirs = cell_forward(cell, x), cell(x)
        for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (ours, theirs))):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-14)


class Classifier(nn.Module):
    """Embedding-free sequence classifier: recurrent module, last step, linear."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        width = (rnn.proj_size or rnn.hidden_size) if isinstance(rnn, nn.LSTM) else rnn.hidden_size
        self.out = nn.Linear(width * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.out(output[:, -1])


class CellLoop(nn.Module):
    """A Python loop over a fixed number of steps of an LSTM cell."""

    def __init__(self):
        super().__init__()
        self.cell, self.out = nn.LSTMCell(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        for t in range(4):
            h, c = self.cell(x[:, t], (h, c))
        return self.out(h)


MODELS = {"lstm": lambda: Classifier(nn.LSTM(4, 5, batch_first=True)),
          "gru_2_layers_bidirectional": lambda: Classifier(nn.GRU(4, 5, 2, batch_first=True, bidirectional=True)),
          "rnn": lambda: Classifier(nn.RNN(4, 5, batch_first=True)),
          "lstm_projections": lambda: Classifier(nn.LSTM(4, 6, 2, batch_first=True, proj_size=3)),
          "lstm_cell_loop": CellLoop}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_recurrent_models_equal_backprop_through_time(name):
    torch.manual_seed(0)
    model = randomise_vectors(MODELS[name]().double())
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    program = assert_matches_autograd(model, x, "auto", ops=["linear"])
    assert frontend_of(program.traced)[0] == "export"
    assert all("forward" not in vars(m) for m in model.modules())      # the capture's patch is gone


def test_another_sequence_length_is_refused_before_the_step():
    torch.manual_seed(0)
    model = MODELS["lstm"]().double()
    program = fbcompile.compile(model, torch.randn(3, 4, 4, dtype=torch.float64))
    with pytest.raises(FBCompileError, match=r"shape \(batch, 4, 4\); this one has shape \(3, 6, 4\)"):
        program.propagate_error(torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64))


def test_train_mode_dropout_between_layers_is_exact_for_the_pass_that_ran():
    torch.manual_seed(0)
    model = Classifier(nn.LSTM(4, 5, 2, batch_first=True, dropout=0.5)).double().train()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    from fbcompile.verify.checks import rule_errors
    for node, (tjml, gap) in rule_errors(program, x).items():
        assert tjml < 1e-10 and gap < 1e-10, node


def test_every_learner_steps_on_an_lstm():
    from test_learners_any_model import LEARNERS, loss_fn
    torch.manual_seed(0)
    model = Classifier(nn.LSTM(6, 8, batch_first=True))
    model.out = nn.Linear(8, 5)
    x, y = torch.randn(6, 4, 6), torch.tensor([0, 1, 2, 3, 4, 1])
    program = fbcompile.compile(model, x)
    for algorithm, options in LEARNERS:
        model.zero_grad(set_to_none=True)
        result = fbcompile.learner(program, algorithm, **options).step(x, y, loss_fn)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert math.isfinite(result.loss) and grads and all(torch.isfinite(g).all() for g in grads), algorithm


def test_the_lstm_meets_the_small_beta_limit():
    torch.manual_seed(0)
    assert dtp_angle(randomise_vectors(MODELS["lstm"]()), torch.randn(3, 4, 4, dtype=torch.float64)) < 0.01


def test_torch_fx_names_the_recurrent_module_and_the_front_end_that_takes_it():
    with pytest.raises(UnsupportedOpError, match="frontend='export' or 'auto' writes them step by step"):
        fbcompile.compile(MODELS["lstm"](), torch.randn(3, 4, 4), frontend="fx")


def test_packed_sequences_are_refused_by_name():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 3, 2]), batch_first=True)
            return self.rnn(packed)[1][0]

    with pytest.raises(FBCompileError, match="PackedSequence"):
        fbcompile.compile(Packed(), torch.randn(3, 4, 4), frontend="export")
