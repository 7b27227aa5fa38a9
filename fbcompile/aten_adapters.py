"""Argument adapters of the ATen spellings (:mod:`fbcompile.aten_spellings`): each takes the fx
node and the ATen call's arguments and returns the canonical op's arguments (the parameter names of
its ``apply``), or raises FBCompileError naming the argument it cannot express.

:func:`renamed` covers most overloads (schema names, ``self`` -> ``input``); the ``*_args``
functions cover the rest: integer option codes mapped back to torch's strings (losses' reduction,
grid_sample's modes, cdist's compute mode), ATen-only forms written as their Python spelling (a
slice as an index, ``t`` and ``numpy_T`` as transpose and permute).
"""
from __future__ import annotations

import torch

from .errors import FBCompileError
from .trace import info

aten = torch.ops.aten


def schema_arguments(overload, args, kwargs) -> dict:
    """The ATen call's arguments by schema name (only those given; defaults stay the op's own)."""
    names = [a.name for a in overload._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def renamed(rename: dict | None = None, drop=(), star: tuple = (), check: dict | None = None):
    """Adapter: schema names, ``self`` -> ``input``, ``rename`` applied, ``drop`` removed; names in
    ``star`` are var-positional in the canonical signature (``view(input, *shape)``) and become a
    tuple; ``check`` = {name: required value}: any other value is refused."""
    rename = {"self": "input", **(rename or {})}

    def adapt(node, *args, **kwargs):
        bound = schema_arguments(node.target, args, kwargs)
        for name, required in (check or {}).items():
            if name in bound and bound[name] != required:
                raise FBCompileError(f"{node.target}: argument {name}={bound[name]!r} has no canonical spelling "
                                     f"(only {required!r})")
        out = {}
        for name, value in bound.items():
            if name in drop:
                continue
            name = rename.get(name, name)
            out[name] = tuple(value) if name in star else value
        return out

    return adapt


def _rank(node) -> int:
    return len(info(node).shape)


def slice_args(node, *args, **kwargs):
    """``aten.slice.Tensor(x, dim, start, end, step)`` is ``x[(:,) * dim + (start:end:step,)]``."""
    a = schema_arguments(node.target, args, kwargs)
    dim = a.get("dim", 0) % _rank(a["self"])
    part = slice(a.get("start"), a.get("end"), a.get("step", 1))
    return {"input": a["self"], "idx": (slice(None),) * dim + (part,)}


def index_args(node, *args, **kwargs):
    """``aten.index.Tensor(x, [None, i])`` is ``x[:, i]`` (None entries keep their dim whole)."""
    a = schema_arguments(node.target, args, kwargs)
    items = tuple(slice(None) if i is None else i for i in a["indices"])
    return {"input": a["self"], "idx": items[0] if len(items) == 1 else items}


def embedding_args(node, *args, **kwargs):
    """ATen puts the weight first and writes "no padding index" as -1."""
    a = schema_arguments(node.target, args, kwargs)
    padding = a.get("padding_idx", -1)
    return {"input": a["indices"], "weight": a["weight"], "padding_idx": None if padding < 0 else padding,
            "scale_grad_by_freq": a.get("scale_grad_by_freq", False), "sparse": a.get("sparse", False)}


def transpose_2d_args(node, *args, **kwargs):
    """``aten.t``: transpose(0, -1) (a 2-D transpose; a 1-D ``t`` is the identity)."""
    return {"input": args[0], "dim0": 0, "dim1": -1}


def same_dtype_args(node, *args, **kwargs):
    """``contiguous`` / ``clone`` / ``alias``: the identity as long as the dtype is unchanged."""
    source, record = args[0], info(node)
    if record.dtype is not None and info(source).dtype != record.dtype:
        raise FBCompileError(f"{node.target} converts {info(source).dtype} to {record.dtype}: a dtype "
                             "conversion inside the model has no feedback rule (compile the model in one dtype)")
    return {"input": source}


def cast_args(node, *args, **kwargs):
    """``to.dtype`` / ``to.dtype_layout`` / ``_to_copy`` / ``type_as``: a conversion to the node's dtype,
    the canonical ``cast`` (a device argument only places the value; see rules/elementwise.py)."""
    return {"input": schema_arguments(node.target, args, kwargs)["self"], "dtype": info(node).dtype}


def upsample_args(mode: str, antialias: bool = False):
    """``upsample_<mode>.vec(input, output_size, [align_corners,] scale_factors)``: F.interpolate's call."""
    def adapt(node, *args, **kwargs):
        a = schema_arguments(node.target, args, kwargs)
        return {"input": a["input"], "size": a.get("output_size"), "scale_factor": a.get("scale_factors"),
                "mode": mode, "align_corners": a.get("align_corners"), "antialias": antialias}
    return adapt


def max_pool_args(node, *args, **kwargs):
    out = renamed()(node, *args, **kwargs)
    if out.get("stride") in ([], ()):
        out["stride"] = None        # ATen's [] means "the kernel size", F.max_pool2d's None
    return out


def stft_args(node, *args, **kwargs):
    out = renamed()(node, *args, **kwargs)
    out.setdefault("center", False)      # aten.stft.default has no centring: export writes the pad before it
    return out


def constant_pad_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"input": a["self"], "pad": a["pad"], "mode": "constant", "value": a.get("value", 0)}


def einsum_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"equation": a["equation"], "operands": tuple(a["tensors"])}


def softmax_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"input": a["self"], "dim": a["dim"], **({"dtype": a["dtype"]} if a.get("dtype") is not None else {})}


def where_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"condition": a["condition"], "input": a["self"], "other": a["other"]}


def rsub_args(node, *args, **kwargs):
    """``aten.rsub(x, c, alpha)`` = c - alpha x."""
    a = schema_arguments(node.target, args, kwargs)
    return {"input": a["other"], "other": a["self"], "alpha": a.get("alpha", 1)}


def tensordot_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"a": a["self"], "b": a["other"], "dims": (list(a["dims_self"]), list(a["dims_other"]))}


# ATen's integer codes of the string options the Python functions take
CDIST_MODES = {None: "use_mm_for_euclid_dist_if_necessary", 0: "use_mm_for_euclid_dist_if_necessary",
               1: "use_mm_for_euclid_dist", 2: "donot_use_mm_for_euclid_dist"}
GRID_MODES, GRID_PADDINGS = ("bilinear", "nearest", "bicubic"), ("zeros", "border", "reflection")


def cdist_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"x1": a["x1"], "x2": a["x2"], "p": a.get("p", 2.0), "compute_mode": CDIST_MODES[a.get("compute_mode")]}


def grid_sampler_args(node, *args, **kwargs):
    a = schema_arguments(node.target, args, kwargs)
    return {"input": a["input"], "grid": a["grid"], "mode": GRID_MODES[a["interpolation_mode"]],
            "padding_mode": GRID_PADDINGS[a["padding_mode"]], "align_corners": a["align_corners"]}


REDUCTIONS = ("none", "mean", "sum")


def loss_args(node, *args, **kwargs):
    """A loss: ``reduction`` from ATen's 0 / 1 / 2 back to torch's names."""
    a = renamed()(node, *args, **kwargs)
    if "reduction" in a:
        a["reduction"] = REDUCTIONS[a["reduction"]]
    return a


def last_two_swapped_args(node, *args, **kwargs):
    """``mT`` / ``mH`` / ``adjoint``: transpose(-2, -1) of a real tensor (conjugation is not supported)."""
    if str(node.target).startswith(("aten.mH", "aten.adjoint")) and info(node).dtype.is_complex:
        raise FBCompileError(f"{node.target} of a complex tensor (conjugation) is not supported")
    return {"input": args[0], "dim0": -2, "dim1": -1}


def all_dims_reversed_args(node, *args, **kwargs):
    """``x.T`` (ATen ``numpy_T``): permute(rank - 1, ..., 0)."""
    return {"input": args[0], "dims": tuple(reversed(range(_rank(node))))}


PLAIN = renamed()
NO_CUDNN = renamed(drop=("cudnn_enable", "cudnn_enabled"))
DROPOUT = renamed(rename={"train": "training"})
