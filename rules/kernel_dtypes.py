"""Operand dtypes for the backward kernels that rules call directly, under ``torch.autocast``.

Autograd runs an op's backward kernel on the tensors its forward kernel saw, with the gradient
arriving at the output cast to the output's dtype (its engine casts every gradient to the dtype of
its tensor). Without autocast the compiled program holds exactly those tensors. Under autocast it
does not:

- an op that autocast runs in lower precision (convolution, linear, matmul: "lower-precision ops"
  in torch.amp's op lists) computed on bfloat16 / float16 copies of its float32 input and weight,
  and the program holds the float32 originals;
- the error arriving at an op's output may be float32 (the error a float32 op after it gave back)
  where its output, and so autograd's gradient, is bfloat16.

The ATen backward kernels (``convolution_backward``, ``native_batch_norm_backward``, the pooling and
activation backwards) need their operands in the dtypes the forward kernel had, so rules pass them
through these functions first. Without autocast both functions return their arguments unchanged
(the same objects, no copy), so float32 / float64 programs stay bitwise as they were.
"""
from __future__ import annotations

import torch


def as_autocast_ran(*tensors):
    """The operands of a lower-precision op as autocast gave them to its kernel: each floating
    tensor other than float64 in its device's autocast dtype while autocast is on for that device
    (autocast leaves float64 and non-floating tensors alone); every tensor unchanged otherwise."""
    return tuple(_autocast(t) for t in tensors)


def like(g: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``g`` in ``reference``'s dtype: the error at a forward value has that value's dtype, as
    autograd's engine casts a gradient to its tensor's dtype."""
    return g if g.dtype == reference.dtype else g.to(reference.dtype)


def _autocast(t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    device = t.device.type
    if not torch.is_autocast_enabled(device):
        return t
    dtype = torch.get_autocast_dtype(device)
    return t if t.dtype == dtype else t.to(dtype)
