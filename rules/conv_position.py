"""The backward of a convolution with one output position per sample, as GEMMs (CPU, ungrouped, 2-d).

A 2-d convolution whose output is 1 x 1 (ResNet-18's last stage at 32x32 inputs) reads, per spatial
dim with input size H, kernel k, dilation d and left padding p, input index t d - p through kernel
tap t; taps in the padding read zeros. With the valid taps T = {t : 0 <= t d - p < H} and X_T, W_T
the input and the weight at them (G: the N x C_out output error):

    dW[:, :, T] = G^T X_T,    dx[at T] = G W_T,    zeros elsewhere,    db = sum_n g_n

(X_T flattened to N x C_in |T|, W_T to C_out x C_in |T|). The same sums as aten's kernels in
another order: equal to rounding. Why: oneDNN's weight-gradient kernel measured 2-12x slower than
even a GEMM over the whole unfolded window at one output position (CPU, 2 threads, 512->512 3x3
at 1x1, batch 32: 2.3-10 ms vs 0.8-1.0 ms, minimum of 25), and the fused call 2.9 vs 1.5 ms; at 4
positions they were even and at 16 the GEMM was 2x slower, so only one position takes this path.
(Stride does not matter at one position.) The forward is left to oneDNN: a GEMM over the valid
taps first gathers W_T out of the kernel layout (a strided read of the whole weight), and in a
ResNet-18 step that gather alone took 1.27 ms of the 1.49 ms oneDNN spends per 512->512 conv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_output_position(g, x, groups) -> bool:
    """Whether the backward takes the GEMM path: on the CPU, an ungrouped 2-d convolution with one
    output position per sample."""
    return x.device.type == "cpu" and groups == 1 and g.dim() == 4 and g.shape[2] * g.shape[3] == 1


def valid_taps(sizes, kernel, dilation, left_pads) -> tuple[list, list]:
    """Per spatial dim, the slice of valid kernel taps T and the slice of input rows they read."""
    taps, inputs = [], []
    for size, k, d, p in zip(sizes, kernel, dilation, left_pads):
        first, last = -(-p // d), min(k - 1, (size - 1 + p) // d)
        taps.append(slice(first, last + 1))
        inputs.append(slice(first * d - p, last * d - p + 1, d))
    return taps, inputs


def single_position_backward(g, x, weight, dilation, padding, has_bias, input_grad):
    """(dx, dW, db) at one output position per sample (module docstring); ``padding``: the left
    padding per dim (symmetric here: the caller pads asymmetric cases explicitly).

    Where several taps are valid but not all (ResNet-18's stride-2 3x3 conv on a 2x2 input: 4 of 9),
    both GEMMs run over the whole kernel window instead: dW = G^T X_win with X_win the input window
    zero-extended to the kernel (one GEMM writes dW once), and dx = (G W)[at T]. Placing G^T X_T in a
    zero dW copies rows of 2 elements at stride 3, and gathering W_T reads the whole kernel layout
    the same way (ResNet-18 step, 512x256x3x3: 1.5 ms each against 0.3 ms GEMMs). At a single valid
    tap, placement and gather are the cheaper ones."""
    taps, inputs = valid_taps(x.shape[2:], weight.shape[2:], dilation, padding)
    rows = g.flatten(1)                                                   # (N, C_out)
    x_valid = x[:, :, inputs[0], inputs[1]]
    single = x_valid.shape[2:].numel() <= 1
    if single:
        dw = placed((rows.t() @ x_valid.flatten(1)).view(weight.shape[:2] + x_valid.shape[2:]), taps, weight.shape)
    else:
        x_window = placed(x_valid, taps, x.shape[:2] + weight.shape[2:])
        dw = (rows.t() @ x_window.flatten(1)).view(weight.shape)
    db = g.sum((0, 2, 3)) if has_bias else None
    dx = None
    if input_grad:
        if single:
            w_valid = weight[:, :, taps[0], taps[1]]
            dx_valid = (rows @ w_valid.flatten(1)).view(x.shape[:2] + w_valid.shape[2:])
        else:
            dx_window = (rows @ weight.flatten(1)).view(x.shape[:2] + weight.shape[2:])
            dx_valid = dx_window[:, :, taps[0], taps[1]]
        dx = placed(dx_valid, inputs, x.shape)
    return dx, dw, db


def placed(values, where: list, shape) -> torch.Tensor:
    """A new tensor of ``shape``, zero but for ``values`` at the slices ``where`` of its last two
    dims: one padding pass where the slices are contiguous (no fill, then copy)."""
    if all(w.step in (None, 1) for w in where):
        return F.pad(values, [p for w, size in zip(reversed(where), reversed(shape[2:]))
                              for p in (w.start, size - w.stop)])
    out = values.new_zeros(shape)
    out[:, :, where[0], where[1]] = values
    return out


def padding_pairs(padding, kernel, dilation) -> list:
    """(left, right) padding per spatial dim of a conv's ``padding`` (int, tuple, 'valid', 'same')."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in (tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * len(kernel))]
