"""More ops whose T rule is autograd's own vector-Jacobian product (:mod:`rules.vjp_ops` explains
the rule, kind "linearised", and why it keeps DTP's small-beta limit):

- elementwise math: hyperbolic and inverse trigonometric functions, ``tan``, ``exp2``, ``log2``,
  ``log10``, ``sinc``, ``erfc``, ``special.erfcx``, ``erfinv``, ``lgamma``, ``digamma``, ``polygamma``,
  ``i0``, ``sgn``, ``frac``, ``deg2rad`` / ``rad2deg``, ``logit``, ``nan_to_num``, ``float_power``, and
  the binary ``xlogy``, ``special.xlog1py``, ``logaddexp`` / ``logaddexp2``, ``copysign``, ``fmod``,
  ``remainder``, ``fmax`` / ``fmin`` (NaN-ignoring maximum and minimum); ``atleast_1d`` / ``atleast_2d`` / ``atleast_3d`` (reshapes of one tensor);
- products: ``baddbmm``, ``addbmm``, ``addmv``, ``addr``, ``tensordot``, ``kron``;
- matrices: ``trace``, ``diag``, ``diag_embed``, ``block_diag``, ``det``, ``logdet``, ``inverse``, ``linalg.solve``,
  ``matrix_exp``, ``linalg.norm``, ``linalg.matrix_norm``, ``cdist``, ``renorm``;
- rearrangements and scans: ``rot90``, ``take_along_dim``, ``logcumsumexp``;
- statistics returning two tensors: ``var_mean``, ``std_mean``, ``aminmax`` (feedback may arrive at
  either output or both);
- writes into a copy of the input: ``scatter``, ``scatter_add``, ``scatter_reduce``, ``index_add``,
  ``index_copy``, ``masked_scatter``, ``index_put`` (and their in-place spellings, ``x.index_add_(...)``;
  the mutation pass makes them out of place), the written values getting their feedback too;
- functional writes ``select_scatter``, ``slice_scatter``, ``diagonal_scatter`` and ATen's ``copy``,
  ``fill``, ``zero`` (item assignment made functional by torch.export); splits
  ``tensor_split``, ``hsplit``, ``vsplit``, ``dsplit``; ``broadcast_tensors``;
  ``diff``, ``dot``, ``vdot``, ``linalg.multi_dot``, ``chain_matmul``, ``pdist``;
- power-average pooling (``nn.LPPool1d`` / ``nn.LPPool2d``; ATen writes it as pow and avg_pool) and
  spatial transformers: ``grid_sample`` and ``affine_grid``.

Every call gets J_F^T g at the saved inputs for each active argument, parameters included (a
``baddbmm`` bias, a ``linalg.solve`` matrix), so error mode equals autograd to rounding. Calls that
can mix samples declare it (``batch_local``), so verification measures them over the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule

from .vjp_ops import (LINEAR_MAPS, _apart, _correction, _keeps_samples_apart, _refused_options, autograd_vjp,
                      mixes_samples)

UNARY = {"sinh": (torch.sinh,), "cosh": (torch.cosh,), "tan": (torch.tan,), "asin": (torch.asin, torch.arcsin),
         "acos": (torch.acos, torch.arccos), "atan": (torch.atan, torch.arctan), "asinh": (torch.asinh, torch.arcsinh),
         "acosh": (torch.acosh, torch.arccosh), "atanh": (torch.atanh, torch.arctanh), "exp2": (torch.exp2,),
         "log2": (torch.log2,), "log10": (torch.log10,), "sinc": (torch.sinc,), "erfc": (torch.erfc,),
         "erfinv": (torch.erfinv,), "lgamma": (torch.lgamma,), "digamma": (torch.digamma,),
         "i0": (torch.i0, torch.special.i0), "sgn": (torch.sgn,), "frac": (torch.frac,),
         "deg2rad": (torch.deg2rad,), "rad2deg": (torch.rad2deg,), "trace": (torch.trace,),
         "det": (torch.det, torch.linalg.det), "logdet": (torch.logdet,),
         "inverse": (torch.inverse, torch.linalg.inv), "matrix_exp": (torch.matrix_exp, torch.linalg.matrix_exp),
         "special_erfcx": (torch.special.erfcx,)}
BINARY = {"xlogy": (torch.xlogy,), "logaddexp": (torch.logaddexp,), "logaddexp2": (torch.logaddexp2,),
          "copysign": (torch.copysign,), "fmod": (torch.fmod,), "remainder": (torch.remainder,),
          "fmax": (torch.fmax,), "fmin": (torch.fmin,),
          "kron": (torch.kron,), "special_xlog1py": (torch.special.xlog1py,)}
#: ops that read the whole input as one matrix or one vector: a batch in front is not separated
WHOLE_TENSOR = {"trace", "kron"}


def _named(name, fn, apply):
    apply.__name__ = apply.__qualname__ = name
    return apply


def _unary(name, fn):
    return _named(name, fn, lambda input: fn(input))


def _binary(name, fn):
    return _named(name, fn, lambda input, other: fn(input, other))


def logit(input, eps=None):
    return torch.logit(input, eps)


def nan_to_num(input, nan=0.0, posinf=None, neginf=None):
    return torch.nan_to_num(input, nan, posinf, neginf)


def polygamma(n, input):
    return torch.polygamma(n, input)


def float_power(input, exponent):
    return torch.float_power(input, exponent)


def baddbmm(input, batch1, batch2, beta=1, alpha=1):
    return torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)


def addbmm(input, batch1, batch2, beta=1, alpha=1):
    return torch.addbmm(input, batch1, batch2, beta=beta, alpha=alpha)


def addmv(input, mat, vec, beta=1, alpha=1):
    return torch.addmv(input, mat, vec, beta=beta, alpha=alpha)


def addr(input, vec1, vec2, beta=1, alpha=1):
    return torch.addr(input, vec1, vec2, beta=beta, alpha=alpha)


def tensordot(a, b, dims=2, out=None):
    return torch.tensordot(a, b, dims)


def diag(input, diagonal=0):
    return torch.diag(input, diagonal)


def diag_embed(input, offset=0, dim1=-2, dim2=-1):
    return torch.diag_embed(input, offset, dim1, dim2)


def linalg_solve(A, B, left=True):
    return torch.linalg.solve(A, B, left=left)


def linalg_norm(input, ord=None, dim=None, keepdim=False, dtype=None):
    return torch.linalg.norm(input, ord, dim, keepdim, dtype=dtype)


def linalg_matrix_norm(input, ord="fro", dim=(-2, -1), keepdim=False, dtype=None):
    return torch.linalg.matrix_norm(input, ord, dim, keepdim, dtype=dtype)


def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    return torch.cdist(x1, x2, p, compute_mode)


def renorm(input, p, dim, maxnorm):
    return torch.renorm(input, p, dim, maxnorm)


def rot90(input, k=1, dims=(0, 1)):
    return torch.rot90(input, k, dims)


def take_along_dim(input, indices, dim=None):
    return torch.take_along_dim(input, indices, dim)


def logcumsumexp(input, dim):
    return torch.logcumsumexp(input, dim)


def var_mean(input, dim=None, unbiased=None, keepdim=False, correction=None):
    return torch.var_mean(input, dim, correction=_correction(unbiased, correction), keepdim=keepdim)


def std_mean(input, dim=None, unbiased=None, keepdim=False, correction=None):
    return torch.std_mean(input, dim, correction=_correction(unbiased, correction), keepdim=keepdim)


def aminmax(input, dim=None, keepdim=False):
    return torch.aminmax(input, dim=dim, keepdim=keepdim)


def lp_pool1d(input, norm_type, kernel_size, stride=None, ceil_mode=False):
    return F.lp_pool1d(input, norm_type, kernel_size, stride, ceil_mode)


def lp_pool2d(input, norm_type, kernel_size, stride=None, ceil_mode=False):
    return F.lp_pool2d(input, norm_type, kernel_size, stride, ceil_mode)


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    return F.grid_sample(input, grid, mode, padding_mode, align_corners)


def affine_grid(theta, size, align_corners=None):
    return F.affine_grid(theta, size, align_corners)


def scatter(input, dim, index, src=None, value=None, reduce=None):
    source = src if src is not None else value
    return torch.scatter(input, dim, index, source, **({} if reduce is None else {"reduce": reduce}))


def scatter_add(input, dim, index, src):
    return torch.scatter_add(input, dim, index, src)


def scatter_reduce(input, dim, index, src, reduce, include_self=True):
    return torch.scatter_reduce(input, dim, index, src, reduce, include_self=include_self)


def index_add(input, dim, index, source, alpha=1):
    return torch.index_add(input, dim, index, source, alpha=alpha)


def index_copy(input, dim, index, source):
    return torch.index_copy(input, dim, index, source)


def masked_scatter(input, mask, source):
    return torch.masked_scatter(input, mask, source)


def index_put(input, indices, values, accumulate=False):
    return torch.index_put(input, tuple(indices), values, accumulate)


def select_scatter(input, src, dim, index):
    return torch.select_scatter(input, src, dim, index)


def slice_scatter(input, src, dim=0, start=None, end=None, step=1):
    if end is not None and end > input.shape[dim]:      # ATen writes an open end as 2**63 - 1, which
        end = input.shape[dim]                          # functorch's batching rule cannot add to
    return torch.slice_scatter(input, src, dim, start, end, step)


def diagonal_scatter(input, src, offset=0, dim1=0, dim2=1):
    return torch.diagonal_scatter(input, src, offset, dim1, dim2)


def tensor_split(input, indices_or_sections, dim=0):
    return torch.tensor_split(input, indices_or_sections, dim)


def _split_along(name, torch_split):
    return _named(name, torch_split, lambda input, indices_or_sections: torch_split(input, indices_or_sections))


def broadcast_tensors(*tensors):
    return torch.broadcast_tensors(*tensors)


def _atleast(k, fn):
    """``torch.atleast_{k}d``: the input itself from rank k on; below, size-1 dims around it (a batch
    of rank < 2 leaves dim 0)."""
    return _named(f"atleast_{k}d", fn, lambda input: fn(input))


def block_diag(*tensors):
    return torch.block_diag(*tensors)


def multi_dot(tensors):
    return torch.linalg.multi_dot(tensors)


def chain_matmul(*matrices):
    return torch.linalg.multi_dot(matrices)


def diff(input, n=1, dim=-1, prepend=None, append=None):
    return torch.diff(input, n, dim, prepend, append)


def dot(input, other):
    return torch.dot(input, other)


def vdot(input, other):
    return torch.vdot(input, other)


def pdist(input, p=2.0):
    return F.pdist(input, p)


def copy(input, src, non_blocking=False):
    """ATen's functional ``copy`` (item assignment, made functional by torch.export): ``src`` cast to
    ``input``'s dtype and broadcast to its shape; nothing of ``input`` but its shape is read. Written
    with differentiable ops (autograd has no derivative for ``aten.copy``)."""
    return src.to(input.dtype).expand_as(input).clone()


def fill(input, value):
    return torch.ops.aten.fill(input, value)


def zero(input):
    return torch.ops.aten.zero(input)


def _lp_module(m):
    return {"norm_type": m.norm_type, "kernel_size": m.kernel_size, "stride": m.stride, "ceil_mode": m.ceil_mode}


def _methods(names):
    return [tensor_method(name) for name in names if hasattr(torch.Tensor, name)]


def _elementwise(table, make):
    ops = []
    for name, functions in table.items():
        names = [name] + [f.__name__ for f in functions[1:] if hasattr(torch.Tensor, f.__name__)]
        ops.append(declare_op(name, make(name, functions[0]), functions=list(functions), methods=_methods(names),
                              batch_local=mixes_samples if name in WHOLE_TENSOR else None))
    return ops


def _declared(name, apply, functions, methods=(), modules=None, batch_local=None, in_place=False):
    inplace = [tensor_method(f"{name}_")] if in_place else []
    return declare_op(name, apply, functions=functions, methods=_methods(methods), modules=modules,
                      batch_local=batch_local, inplace=inplace)


def _writes_into_a_copy(name, apply, batch_local):
    """An op writing values into a copy of ``input`` (its in-place spelling ``x.name_(...)`` too)."""
    return _declared(name, apply, [getattr(torch, name)], [name], batch_local=batch_local, in_place=True)


MATH_OPS = [
    *_elementwise(UNARY, _unary),
    *_elementwise(BINARY, _binary),
    _declared("logit", logit, [torch.logit], ["logit"]),
    _declared("nan_to_num", nan_to_num, [torch.nan_to_num], ["nan_to_num"]),
    _declared("polygamma", polygamma, [torch.polygamma]),
    _declared("float_power", float_power, [torch.float_power], ["float_power"]),
    _declared("baddbmm", baddbmm, [torch.baddbmm], ["baddbmm"]),
    _declared("addbmm", addbmm, [torch.addbmm], ["addbmm"], batch_local=mixes_samples),
    _declared("addmv", addmv, [torch.addmv], ["addmv"], batch_local=mixes_samples),
    _declared("addr", addr, [torch.addr], ["addr"], batch_local=mixes_samples),
    _declared("tensordot", tensordot, [torch.tensordot], batch_local=mixes_samples),
    _declared("diag", diag, [torch.diag], ["diag"], batch_local=mixes_samples),
    _declared("diag_embed", diag_embed, [torch.diag_embed], ["diag_embed"], batch_local=_apart(("dim1", "dim2"))),
    _declared("linalg_solve", linalg_solve, [torch.linalg.solve], batch_local=mixes_samples),
    _declared("linalg_norm", linalg_norm, [torch.linalg.norm], batch_local=_keeps_samples_apart),
    _declared("linalg_matrix_norm", linalg_matrix_norm, [torch.linalg.matrix_norm], batch_local=_keeps_samples_apart),
    _declared("cdist", cdist, [torch.cdist], batch_local=lambda ctx: len(ctx.shape("x1")) > 2),
    _declared("renorm", renorm, [torch.renorm], ["renorm"], batch_local=lambda ctx: ctx.const("dim") == 0),
    _declared("rot90", rot90, [torch.rot90], ["rot90"], batch_local=_apart(("dims",))),
    _declared("take_along_dim", take_along_dim, [torch.take_along_dim], ["take_along_dim"],
              batch_local=_keeps_samples_apart),
    _declared("logcumsumexp", logcumsumexp, [torch.logcumsumexp], ["logcumsumexp"], batch_local=_keeps_samples_apart),
    _declared("var_mean", var_mean, [torch.var_mean], batch_local=_keeps_samples_apart),
    _declared("std_mean", std_mean, [torch.std_mean], batch_local=_keeps_samples_apart),
    _declared("aminmax", aminmax, [torch.aminmax], ["aminmax"], batch_local=_keeps_samples_apart),
    _declared("lp_pool1d", lp_pool1d, [F.lp_pool1d], modules={nn.LPPool1d: _lp_module}),
    _declared("lp_pool2d", lp_pool2d, [F.lp_pool2d], modules={nn.LPPool2d: _lp_module}),
    _declared("grid_sample", grid_sample, [F.grid_sample]),
    *(_writes_into_a_copy(name, apply, _keeps_samples_apart) for name, apply in (
        ("scatter", scatter), ("scatter_add", scatter_add), ("scatter_reduce", scatter_reduce),
        ("index_add", index_add), ("index_copy", index_copy))),
    _writes_into_a_copy("masked_scatter", masked_scatter, mixes_samples),
    *(_declared(name, apply, [getattr(torch, name)], [name], batch_local=_keeps_samples_apart)
      for name, apply in (("select_scatter", select_scatter), ("slice_scatter", slice_scatter))),
    _declared("diagonal_scatter", diagonal_scatter, [torch.diagonal_scatter], ["diagonal_scatter"],
              batch_local=_apart(("dim1", "dim2"), default=0)),
    _declared("tensor_split", tensor_split, [torch.tensor_split], ["tensor_split"], batch_local=_keeps_samples_apart),
    *(_declared(name, _split_along(name, fn), [fn], [name], batch_local=local) for name, fn, local in (
        ("hsplit", torch.hsplit, lambda ctx: len(ctx.shape("input")) > 1), ("vsplit", torch.vsplit, mixes_samples),
        ("dsplit", torch.dsplit, None))),
    _declared("broadcast_tensors", broadcast_tensors, [torch.broadcast_tensors], batch_local=mixes_samples),
    _declared("multi_dot", multi_dot, [torch.linalg.multi_dot], batch_local=mixes_samples),
    _declared("block_diag", block_diag, [torch.block_diag], batch_local=mixes_samples),
    *(_declared(f"atleast_{k}d", _atleast(k, fn), [fn], batch_local=lambda ctx: len(ctx.shape("input")) >= 2)
      for k, fn in ((1, torch.atleast_1d), (2, torch.atleast_2d), (3, torch.atleast_3d))),
    _declared("chain_matmul", chain_matmul, [torch.chain_matmul], batch_local=mixes_samples),
    _declared("diff", diff, [torch.diff], ["diff"], batch_local=_keeps_samples_apart),
    _declared("dot", dot, [torch.dot], ["dot"], batch_local=mixes_samples),
    _declared("vdot", vdot, [torch.vdot], ["vdot"], batch_local=mixes_samples),
    _declared("pdist", pdist, [F.pdist], batch_local=mixes_samples),
    _writes_into_a_copy("index_put", index_put, mixes_samples),
    _declared("affine_grid", affine_grid, [F.affine_grid], batch_local=mixes_samples),     # size holds the batch
    *(_declared(name, apply, []) for name, apply in (("copy", copy), ("fill", fill), ("zero", zero))),
]


def _differentiable(ctx):
    if ctx.op_call.args.get("reduce") is not None and ctx.op_call.spec is MATH_OPS_BY_NAME["scatter"]:
        return (f"{ctx.name}: scatter with reduce={ctx.const('reduce')!r} has no derivative in torch; "
                "use scatter_reduce")
    return _refused_options(ctx)


MATH_OPS_BY_NAME = {op.name: op for op in MATH_OPS}
LINEAR_MAPS.update(MATH_OPS_BY_NAME[name] for name in ("baddbmm", "addbmm", "addmv", "addr", "tensordot", "kron",
                                                       "linalg_solve", "multi_dot", "chain_matmul", "dot", "vdot"))
for _op in MATH_OPS:
    register_rule(_op, conditions="T", kind="linearised", supports=_differentiable,
                  complex_values=True)(autograd_vjp)
