"""Recurrent modules (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) unrolled over time for torch.export, and
their cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``) written as one step.

torch.export writes a recurrent module as one ATen call (``aten.lstm.input``) whose weights travel
in a list: no rule could give each of them its feedback weight or its place in a unit. While the
model is exported, each recurrent module's ``forward`` is replaced (on the instance, for the
duration of the capture only) by the same computation written step by step in torch ops, reading
the module's own parameters, so the captured graph is linears, gates and products that the rule
library already covers, for every learner: backprop through time in ``bp``, feedback alignment with a
feedback matrix per weight in ``fa``, targets at every step in ``dtp``.

One step of layer l (x_t its input at time t, h and c the previous state; PyTorch's gate order):

    LSTM: i, f, g, o = split(W_ih x_t + b_ih + W_hh h + b_hh)
          c' = sigmoid(f) c + sigmoid(i) tanh(g),  h' = sigmoid(o) tanh(c')  (then W_hr h' with proj_size)
    GRU:  r = sigmoid(i_r + h_r), z = sigmoid(i_z + h_z), n = tanh(i_n + r h_n), h' = (1 - z) n + z h
          with (i_r, i_z, i_n) = W_ih x_t + b_ih and (h_r, h_z, h_n) = W_hh h + b_hh
    RNN:  h' = tanh(W_ih x_t + b_ih + W_hh h + b_hh)  (relu with nonlinearity="relu")

A reverse direction runs the steps from the last time to the first; a layer's output concatenates its
directions; dropout (train mode) applies to every layer's output but the last. The result is the
module's (output, h_n) or (output, (h_n, c_n)), equal to its fused kernel to rounding.

The unrolled graph holds the example's sequence length: the export front end records it as a fixed
size of the input (:mod:`fbcompile.input_shapes`), and inputs of another length are refused before
a step. Packed sequences are refused by name.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FBCompileError

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


@contextlib.contextmanager
def recurrent_modules_unrolled(model: nn.Module):
    """Within the block, every recurrent submodule of ``model`` computes through
    :func:`unrolled_forward`, and every cell (``nn.LSTMCell``, ...) through :func:`cell_forward`."""
    patched = [m for m in model.modules() if isinstance(m, RECURRENT + CELLS) and "forward" not in vars(m)]
    for module in patched:
        module.forward = (unrolled_forward if isinstance(module, RECURRENT) else cell_forward).__get__(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def cell_forward(module: nn.RNNCellBase, input, hx=None):
    """``module(input, hx)`` of a cell: one :func:`_step`."""
    mode = _cell_mode(module)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    if hx is None:
        zeros = x.new_zeros(x.shape[0], module.hidden_size)
        h, c = zeros, (zeros if mode == "LSTM" else None)
    else:
        h, c = hx if mode == "LSTM" else (hx, None)
        if unbatched:
            h, c = h.unsqueeze(0), (c.unsqueeze(0) if c is not None else None)
    h, c = _step(mode, x, h, c, module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh, None)
    if unbatched:
        h, c = h.squeeze(0), (c.squeeze(0) if c is not None else None)
    return (h, c) if mode == "LSTM" else h


def _cell_mode(module) -> str:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"


def unrolled_forward(module: nn.RNNBase, input, hx=None):
    """``module(input, hx)`` step by step (module docstring)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise FBCompileError(f"{type(module).__name__} on a PackedSequence is not supported: pass a padded tensor")
    lstm = module.mode == "LSTM"
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if module.batch_first else input)
    directions = 2 if module.bidirectional else 1
    h0, c0 = _initial_state(module, x, hx, unbatched, directions)
    last_h, last_c = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            out, h, c = _run_direction(module, x, h0[index], c0[index] if lstm else None, layer, direction)
            outputs.append(out)
            last_h.append(h)
            last_c.append(c)
        x = torch.cat(outputs, -1) if directions == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, True)
    output = x.squeeze(1) if unbatched else (x.transpose(0, 1) if module.batch_first else x)
    h_n = torch.stack(last_h, 0)
    h_n = h_n.squeeze(1) if unbatched else h_n
    if not lstm:
        return output, h_n
    c_n = torch.stack(last_c, 0)
    return output, (h_n, c_n.squeeze(1) if unbatched else c_n)


def _initial_state(module, x, hx, unbatched, directions):
    """(h0, c0) as (layers * directions, batch, size) tensors; zeros where ``hx`` is None."""
    layers, batch = module.num_layers * directions, x.shape[1]
    hidden = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    if module.mode == "LSTM":
        if hx is None:
            return (x.new_zeros(layers, batch, hidden), x.new_zeros(layers, batch, module.hidden_size))
        h0, c0 = hx
        return (h0.unsqueeze(1), c0.unsqueeze(1)) if unbatched else (h0, c0)
    if hx is None:
        return x.new_zeros(layers, batch, hidden), None
    return (hx.unsqueeze(1) if unbatched else hx), None


def _run_direction(module, x, h, c, layer: int, direction: int):
    """One layer and direction over x (time, batch, features): (outputs in time order, h_T, c_T)."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    weights = [getattr(module, f"{name}{suffix}", None) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                      "weight_hr")]
    steps = x.unbind(0)
    order = range(len(steps) - 1, -1, -1) if direction else range(len(steps))
    outputs = [None] * len(steps)
    for t in order:
        h, c = _step(module.mode, steps[t], h, c, *weights)
        outputs[t] = h
    return torch.stack(outputs, 0), h, c


def _step(mode: str, x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):
    """One time step of ``mode`` (module docstring): the new (h, c); c is None but for LSTM."""
    gates_x, gates_h = F.linear(x_t, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if mode == "GRU":
        x_r, x_z, x_n = gates_x.chunk(3, -1)
        h_r, h_z, h_n = gates_h.chunk(3, -1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    activation = torch.tanh if mode == "RNN_TANH" else torch.relu
    return activation(gates_x + gates_h), None
