"""ATen spellings of the canonical ops: the table the torch.export front end binds through.

``torch.export`` (training IR) writes ``nn.Linear``, ``F.linear`` and ``x @ W.T + b`` as ATen
overloads such as ``torch.ops.aten.linear.default``. Each overload here is bound, by identity, to
the canonical op declared in ``rules/`` with an *argument adapter*: a function of the node and its
ATen arguments returning the canonical arguments (the parameter names of the op's ``apply``). The
rules of ``rules/`` then serve both front ends unchanged; no rule is written twice.

Most overloads take torch's own argument names with ``self`` for the first tensor, so
:func:`renamed` binds them by the overload's schema and renames ``self`` to ``input``. Ops that exist
only at ATen level (``addmm``, ``pow.Tensor_Scalar``, ``slice.Tensor``, ``index.Tensor``) are
declared as canonical ops of their own in ``rules/aten_*.py`` or adapted to the equivalent Python
spelling (a slice is ``input[(:, ..., start:end:step)]``, the canonical ``index`` op).
"""
from __future__ import annotations

import torch

from .aten_adapters import (
    DROPOUT, NO_CUDNN, PLAIN, all_dims_reversed_args, cast_args, cdist_args, constant_pad_args, einsum_args,
    embedding_args, grid_sampler_args, index_args, last_two_swapped_args, loss_args, max_pool_args, renamed,
    rsub_args, same_dtype_args, slice_args, softmax_args, stft_args, tensordot_args, transpose_2d_args,
    upsample_args, where_args)
from .ops import declare_aten

FRACTIONAL = renamed(rename={"random_samples": "_random_samples"})   # the window offsets torch drew

aten = torch.ops.aten


def _by_op(pairs) -> dict:
    """{op: [overload, ...]} from (op, overload) pairs."""
    grouped = {}
    for op, overload in pairs:
        grouped.setdefault(op, []).append(overload)
    return grouped


# canonical op -> [(ATen overload name, adapter, in place)]
TABLE = {
    "linear": [("linear.default", PLAIN, False)],
    "conv1d": [("conv1d.default", PLAIN, False), ("conv1d.padding", PLAIN, False)],
    "conv2d": [("conv2d.default", PLAIN, False), ("conv2d.padding", PLAIN, False)],
    "conv3d": [("conv3d.default", PLAIN, False), ("conv3d.padding", PLAIN, False)],
    **{f"conv_transpose{n}d": [(f"conv_transpose{n}d.{'default' if n == 1 else 'input'}", PLAIN, False)]
       for n in (1, 2, 3)},
    "batch_norm": [("batch_norm.default", NO_CUDNN, False)],
    "layer_norm": [("layer_norm.default", NO_CUDNN, False)],
    "group_norm": [("group_norm.default", NO_CUDNN, False)],
    "instance_norm": [("instance_norm.default", NO_CUDNN, False)],
    "lerp": [("lerp.Scalar", renamed(rename={"weight": "fraction"}), False),
             ("lerp.Tensor", renamed(rename={"weight": "fraction"}), False)],
    "embedding": [("embedding.default", embedding_args, False)],
    "dropout": [("dropout.default", DROPOUT, False), ("dropout_.default", DROPOUT, True)],
    "native_dropout": [("native_dropout.default", PLAIN, False)],
    "feature_dropout": [("feature_dropout.default", DROPOUT, False), ("feature_dropout_.default", DROPOUT, True)],
    "alpha_dropout": [("alpha_dropout.default", DROPOUT, False), ("alpha_dropout_.default", DROPOUT, True)],
    "feature_alpha_dropout": [("feature_alpha_dropout.default", DROPOUT, False),
                              ("feature_alpha_dropout_.default", DROPOUT, True)],
    "rrelu": [("rrelu.default", renamed(drop=("generator",), check={"generator": None}), False),
              ("rrelu_.default", renamed(drop=("generator",), check={"generator": None}), True)],
    "scaled_dot_product_attention": [("scaled_dot_product_attention.default", PLAIN, False)],
    "softmax": [("softmax.int", softmax_args, False), ("_softmax.default", renamed(drop=("half_to_float",)), False)],
    "log_softmax": [("log_softmax.int", softmax_args, False)],
    # torch.multiply / subtract / divide / true_divide are aliases ATen keeps under their own names
    "add": [("add.Tensor", PLAIN, False), ("add.Scalar", PLAIN, False), ("add_.Tensor", PLAIN, True),
            ("add_.Scalar", PLAIN, True)],
    "sub": [(f"{name}{suffix}.{overload}", PLAIN, bool(suffix)) for name in ("sub", "subtract")
            for suffix in ("", "_") for overload in ("Tensor", "Scalar")]
           + [("rsub.Scalar", rsub_args, False), ("rsub.Tensor", rsub_args, False)],
    "mul": [(f"{name}{suffix}.{overload}", PLAIN, bool(suffix)) for name in ("mul", "multiply")
            for suffix in ("", "_") for overload in ("Tensor", "Scalar")],
    "div": [(f"{name}{suffix}.{overload}", PLAIN, bool(suffix)) for name in ("div", "divide", "true_divide")
            for suffix in ("", "_") for overload in ("Tensor", "Scalar")]
           + [(f"{name}.Tensor_mode", PLAIN, False) for name in ("div", "divide")],
    "neg": [("neg.default", PLAIN, False)],
    "mean": [("mean.dim", PLAIN, False), ("mean.default", PLAIN, False)],
    "sum": [("sum.dim_IntList", PLAIN, False), ("sum.default", PLAIN, False)],
    "matmul": [("matmul.default", PLAIN, False)],
    "mm": [("mm.default", PLAIN, False)],
    "bmm": [("bmm.default", PLAIN, False)],
    "einsum": [("einsum.default", einsum_args, False)],
    "view": [("view.default", renamed(rename={"size": "shape"}, star=("shape",)), False),
             ("reshape.default", renamed(star=("shape",)), False),
             ("_unsafe_view.default", renamed(rename={"size": "shape"}, star=("shape",)), False)],
    "flatten": [("flatten.using_ints", PLAIN, False)],
    "unflatten": [("unflatten.int", PLAIN, False)],
    "squeeze": [("squeeze.default", PLAIN, False), ("squeeze.dim", PLAIN, False), ("squeeze.dims", PLAIN, False)],
    "unsqueeze": [("unsqueeze.default", PLAIN, False)],
    "transpose": [("transpose.int", PLAIN, False), ("t.default", transpose_2d_args, False),
                  *((f"{name}.default", last_two_swapped_args, False) for name in ("mT", "mH", "adjoint")),
                  ("swapaxes.default", renamed(rename={"axis0": "dim0", "axis1": "dim1"}), False),
                  ("swapdims.default", PLAIN, False)],
    "permute": [("permute.default", renamed(star=("dims",)), False),
                ("numpy_T.default", all_dims_reversed_args, False)],
    "identity": [("contiguous.default", same_dtype_args, False), ("clone.default", same_dtype_args, False),
                 ("alias.default", same_dtype_args, False)],
    "cast": [("to.dtype", cast_args, False), ("to.dtype_layout", cast_args, False),
             ("_to_copy.default", cast_args, False), ("type_as.default", cast_args, False)],
    "cat": [("cat.default", PLAIN, False)],
    "stack": [("stack.default", PLAIN, False)],
    "split": [("split.Tensor", renamed(rename={"split_size": "split_size_or_sections"}), False),
              ("split_with_sizes.default", renamed(rename={"split_sizes": "split_size_or_sections"}), False)],
    "chunk": [("chunk.default", PLAIN, False)],
    "unbind": [("unbind.int", PLAIN, False)],
    "expand": [("expand.default", renamed(rename={"size": "sizes"}, drop=("implicit",), star=("sizes",)), False)],
    "expand_as": [("expand_as.default", PLAIN, False)],
    "repeat": [("repeat.default", renamed(star=("repeats",)), False)],
    "tile": [("tile.default", PLAIN, False)],
    "roll": [("roll.default", PLAIN, False)],
    "flip": [("flip.default", renamed(star=("dims",)), False)],
    "select": [("select.int", PLAIN, False)],
    "narrow": [("narrow.default", PLAIN, False)],
    "index": [("slice.Tensor", slice_args, False), ("index.Tensor", index_args, False)],
    "gather": [("gather.default", PLAIN, False)],
    "index_select": [("index_select.default", PLAIN, False)],
    "where": [("where.self", where_args, False), ("where.ScalarOther", where_args, False),
              ("where.ScalarSelf", where_args, False)],
    "masked_fill": [("masked_fill.Scalar", PLAIN, False), ("masked_fill.Tensor", PLAIN, False),
                    ("masked_fill_.Scalar", PLAIN, True), ("masked_fill_.Tensor", PLAIN, True)],
    "pad": [("pad.default", PLAIN, False), ("constant_pad_nd.default", constant_pad_args, False)],
    "max": [("max.dim", PLAIN, False)],
    "amax": [("amax.default", PLAIN, False)],
    "amin": [("amin.default", PLAIN, False)],
    "max_pool1d": [("max_pool1d.default", max_pool_args, False)],
    "max_pool2d": [("max_pool2d.default", max_pool_args, False)],
    "max_pool3d": [("max_pool3d.default", max_pool_args, False)],
    "max_pool1d_with_indices": [("max_pool1d_with_indices.default", max_pool_args, False)],
    "max_pool2d_with_indices": [("max_pool2d_with_indices.default", max_pool_args, False)],
    "max_pool3d_with_indices": [("max_pool3d_with_indices.default", max_pool_args, False)],
    "max_unpool2d": [("max_unpool2d.default", PLAIN, False)],
    "max_unpool3d": [("max_unpool3d.default", PLAIN, False)],
    "adaptive_max_pool1d_with_indices": [("adaptive_max_pool1d.default", PLAIN, False)],
    "adaptive_max_pool2d_with_indices": [("adaptive_max_pool2d.default", PLAIN, False)],
    "adaptive_max_pool3d_with_indices": [("adaptive_max_pool3d.default", PLAIN, False)],
    "stft": [("stft.default", stft_args, False), ("stft.center", stft_args, False)],
    "istft": [("istft.default", PLAIN, False)],
    "fractional_max_pool2d_with_indices": [("fractional_max_pool2d.default", FRACTIONAL, False)],
    "fractional_max_pool3d_with_indices": [("fractional_max_pool3d.default", FRACTIONAL, False)],
    "avg_pool1d": [("avg_pool1d.default", max_pool_args, False)],
    "avg_pool2d": [("avg_pool2d.default", max_pool_args, False)],
    "avg_pool3d": [("avg_pool3d.default", max_pool_args, False)],
    "adaptive_avg_pool1d": [("adaptive_avg_pool1d.default", PLAIN, False)],
    "adaptive_avg_pool2d": [("adaptive_avg_pool2d.default", PLAIN, False)],
    "adaptive_avg_pool3d": [("adaptive_avg_pool3d.default", PLAIN, False)],
    "relu": [("relu.default", PLAIN, False), ("relu_.default", PLAIN, True)],
    "relu6": [("relu6.default", PLAIN, False), ("relu6_.default", PLAIN, True)],
    "gelu": [("gelu.default", PLAIN, False), ("gelu_.default", PLAIN, True)],
    "silu": [("silu.default", PLAIN, False), ("silu_.default", PLAIN, True)],
    "mish": [("mish.default", PLAIN, False), ("mish_.default", PLAIN, True)],
    "sigmoid": [("sigmoid.default", PLAIN, False), ("sigmoid_.default", PLAIN, True)],
    "tanh": [("tanh.default", PLAIN, False), ("tanh_.default", PLAIN, True)],
    "hardswish": [("hardswish.default", PLAIN, False), ("hardswish_.default", PLAIN, True)],
    "hardsigmoid": [("hardsigmoid.default", PLAIN, False), ("hardsigmoid_.default", PLAIN, True)],
    "hardtanh": [("hardtanh.default", PLAIN, False), ("hardtanh_.default", PLAIN, True)],
    "leaky_relu": [("leaky_relu.default", PLAIN, False), ("leaky_relu_.default", PLAIN, True)],
    "elu": [("elu.default", renamed(drop=("scale", "input_scale"), check={"scale": 1, "input_scale": 1}), False),
            ("elu_.default", renamed(drop=("scale", "input_scale"), check={"scale": 1, "input_scale": 1}), True)],
    "softplus": [("softplus.default", PLAIN, False)],
    "addmm": [("addmm.default", renamed(rename={"self": "bias", "mat1": "input", "mat2": "weight"}), False)],
    "pow": [("pow.Tensor_Scalar", PLAIN, False), ("pow_.Scalar", PLAIN, True), ("pow.Tensor_Tensor", PLAIN, False),
            ("pow.Scalar", PLAIN, False)],
    **{name: [(f"{name}.default", PLAIN, False), (f"{name}_.default", PLAIN, True)]
       for name in ("exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "sin", "cos", "log1p", "expm1", "erf",
                    "round", "floor", "ceil", "trunc", "sign")},
    "interpolate": [(f"{op}.vec", upsample_args(mode, aa), False) for op, mode, aa in (
        ("upsample_nearest1d", "nearest", False), ("upsample_nearest2d", "nearest", False),
        ("upsample_nearest3d", "nearest", False), ("_upsample_nearest_exact1d", "nearest-exact", False),
        ("_upsample_nearest_exact2d", "nearest-exact", False), ("_upsample_nearest_exact3d", "nearest-exact", False),
        ("upsample_linear1d", "linear", False), ("upsample_bilinear2d", "bilinear", False),
        ("upsample_trilinear3d", "trilinear", False), ("upsample_bicubic2d", "bicubic", False),
        ("_upsample_bilinear2d_aa", "bilinear", True), ("_upsample_bicubic2d_aa", "bicubic", True))],
    "vector_norm": [("linalg_vector_norm.default", PLAIN, False)],
    "norm": [("norm.ScalarOpt_dim", PLAIN, False), ("norm.Scalar", PLAIN, False)],
    "reshape_as": [("reshape_as.default", PLAIN, False), ("view_as.default", PLAIN, False)],
    "detach": [("detach.default", PLAIN, False)],
    "weight_norm": [("_weight_norm.default", PLAIN, False)],
    **{name: [(overload, PLAIN, False) for overload in overloads] for name, overloads in _by_op((
        ("var", "var.correction"), ("std", "std.correction"), ("var", "var.dim"), ("std", "std.dim"),
        ("var", "var.default"), ("std", "std.default"), ("logsumexp", "logsumexp.default"),
        ("cumsum", "cumsum.default"), ("square", "square.default"), ("selu", "selu.default"), ("celu", "celu.default"),
        ("logsigmoid", "log_sigmoid.default"), ("glu", "glu.default"), ("prelu", "prelu.default"),
        ("rms_norm", "rms_norm.default"), ("pixel_shuffle", "pixel_shuffle.default"),
        ("pixel_unshuffle", "pixel_unshuffle.default"), ("maximum", "maximum.default"), ("minimum", "minimum.default"),
        ("maximum", "max.other"), ("minimum", "min.other"),     # torch.max(a, b), torch.min(a, b) of two tensors
        ("prod", "prod.default"), ("prod", "prod.dim_int"), ("addcmul", "addcmul.default"), ("addcdiv", "addcdiv.default"),
        ("triu", "triu.default"), ("tril", "tril.default"),
        ("mv", "mv.default"), ("outer", "outer.default"), ("unfold", "im2col.default"), ("fold", "col2im.default"),
        ("hardshrink", "hardshrink.default"), ("softshrink", "softshrink.default"), ("threshold", "threshold.default"),
        ("channel_shuffle", "channel_shuffle.default"), ("channel_shuffle", "native_channel_shuffle.default"),
        ("cosine_similarity", "cosine_similarity.default"), ("pairwise_distance", "pairwise_distance.default"),
        ("atan2", "atan2.default"), ("hypot", "hypot.default"), ("diagonal", "diagonal.default"),
        ("movedim", "movedim.int"), ("movedim", "movedim.intlist"), ("cumprod", "cumprod.default"),
        ("repeat_interleave", "repeat_interleave.self_int"), ("unfold_windows", "unfold.default"),
        ("sort", "sort.default"), ("sort", "sort.stable"), ("topk", "topk.default"), ("kthvalue", "kthvalue.default"),
        ("median", "median.dim"), ("nanmedian", "nanmedian.dim"), ("median", "median.default"),
        ("nanmedian", "nanmedian.default"), ("mode", "mode.default"),
        ("cummax", "cummax.default"), ("cummin", "cummin.default"),
        *((name, f"{name}.default") for name in (
            "sinh", "cosh", "tan", "asin", "acos", "atan", "asinh", "acosh", "atanh", "exp2", "log2", "log10", "sinc",
            "erfc", "erfinv", "lgamma", "digamma", "i0", "sgn", "frac", "deg2rad", "rad2deg", "trace", "logdet",
            "matrix_exp", "logaddexp", "logaddexp2", "fmax", "fmin", "kron", "logit", "nan_to_num", "polygamma",
            "baddbmm", "addbmm", "addmv", "addr", "diag", "diag_embed", "linalg_solve", "linalg_norm",
            "linalg_matrix_norm", "renorm", "rot90", "take_along_dim", "logcumsumexp", "aminmax", "special_erfcx",
            "special_xlog1py", "atleast_1d", "atleast_2d", "atleast_3d")),
        ("i0", "special_i0.default"), ("matrix_exp", "linalg_matrix_exp.default"),
        *((name, f"arc{name[1:]}.default") for name in ("asin", "acos", "atan", "asinh", "acosh", "atanh")),
        ("xlogy", "xlogy.Tensor"), ("xlogy", "xlogy.Scalar_Other"),
        ("xlogy", "xlogy.Scalar_Self"), ("copysign", "copysign.Tensor"), ("copysign", "copysign.Scalar"),
        ("fmod", "fmod.Tensor"), ("fmod", "fmod.Scalar"), ("remainder", "remainder.Tensor"),
        ("remainder", "remainder.Scalar"), ("remainder", "remainder.Scalar_Tensor"),
        ("float_power", "float_power.Tensor_Tensor"), ("float_power", "float_power.Tensor_Scalar"),
        ("float_power", "float_power.Scalar"), ("linalg_norm", "linalg_norm.ord_str"),
        ("linalg_matrix_norm", "linalg_matrix_norm.str_ord"), ("var_mean", "var_mean.correction"),
        ("var_mean", "var_mean.dim"), ("var_mean", "var_mean.default"), ("std_mean", "std_mean.correction"),
        ("std_mean", "std_mean.dim"), ("std_mean", "std_mean.default"),
        ("affine_grid", "affine_grid_generator.default"), ("select_scatter", "select_scatter.default"),
        ("slice_scatter", "slice_scatter.default"), ("diagonal_scatter", "diagonal_scatter.default"),
        ("diff", "diff.default"), ("vdot", "vdot.default"), ("pdist", "pdist.default"),
        ("bilinear", "bilinear.default"), ("multi_dot", "linalg_multi_dot.default"), ("copy", "copy.default"),
        ("fill", "fill.Scalar"),
        ("fill", "fill.Tensor"), ("zero", "zero.default"))
    ).items()},
    "scatter": [("scatter.src", PLAIN, False), ("scatter.value", PLAIN, False), ("scatter_.src", PLAIN, True),
                ("scatter_.value", PLAIN, True)],
    "scatter_reduce": [("scatter_reduce.two", PLAIN, False), ("scatter_reduce_.two", PLAIN, True)],
    **{name: [(f"{name}.default", PLAIN, False), (f"{name}_.default", PLAIN, True)]
       for name in ("scatter_add", "index_add", "index_copy", "masked_scatter", "index_put")},
    "det": [("det.default", PLAIN, False), ("linalg_det.default", renamed(rename={"A": "input"}), False)],
    "inverse": [("inverse.default", PLAIN, False), ("linalg_inv.default", renamed(rename={"A": "input"}), False)],
    "tensordot": [("tensordot.default", tensordot_args, False)],
    **{name: [(overload, loss_args, False) for overload in overloads] for name, overloads in _by_op((
        ("mse_loss", "mse_loss.default"), ("l1_loss", "l1_loss.default"), ("smooth_l1_loss", "smooth_l1_loss.default"),
        ("huber_loss", "huber_loss.default"), ("cross_entropy", "cross_entropy_loss.default"),
        ("nll_loss", "nll_loss_nd.default"), ("nll_loss", "nll_loss.default"), ("nll_loss", "nll_loss2d.default"),
        ("kl_div", "kl_div.default"), ("binary_cross_entropy", "binary_cross_entropy.default"),
        ("binary_cross_entropy_with_logits", "binary_cross_entropy_with_logits.default"),
        ("cosine_embedding_loss", "cosine_embedding_loss.default"),
        ("margin_ranking_loss", "margin_ranking_loss.default"), ("soft_margin_loss", "soft_margin_loss.default"),
        ("hinge_embedding_loss", "hinge_embedding_loss.default"),
        ("triplet_margin_loss", "triplet_margin_loss.default"))).items()},
    **{name: [(f"{name}.default", PLAIN, False)] for name in (
        *(f"fft_{kind}{dims}" for kind in ("fft", "ifft", "rfft", "irfft") for dims in ("", "2", "n")),
        "fft_hfft", "fft_ihfft", "real", "imag", "view_as_real", "view_as_complex", "complex")},
    "tensor_split": [("tensor_split.sections", renamed(rename={"sections": "indices_or_sections"}), False),
                     ("tensor_split.indices", renamed(rename={"indices": "indices_or_sections"}), False)],
    **{name: [(f"{name}.int", renamed(rename={"sections": "indices_or_sections"}), False),
              (f"{name}.array", renamed(rename={"indices": "indices_or_sections"}), False)]
       for name in ("hsplit", "vsplit", "dsplit")},
    "broadcast_to": [("broadcast_to.default", renamed(star=("size",)), False)],
    "broadcast_tensors": [("broadcast_tensors.default", renamed(star=("tensors",)), False)],
    "chain_matmul": [("chain_matmul.default", renamed(star=("matrices",)), False)],
    "block_diag": [("block_diag.default", renamed(star=("tensors",)), False)],
    "dot": [("dot.default", renamed(rename={"tensor": "other"}), False)],
    "cdist": [("cdist.default", cdist_args, False)],
    "grid_sample": [("grid_sampler.default", grid_sampler_args, False),
                    ("grid_sampler_2d.default", grid_sampler_args, False)],
    "clamp": [("clamp.default", PLAIN, False), ("clamp_.default", PLAIN, True), ("clamp_min.default", PLAIN, False),
              ("clamp_max.default", PLAIN, False), ("clamp.Tensor", PLAIN, False), ("clamp_min.Tensor", PLAIN, False),
              ("clamp_max.Tensor", PLAIN, False)],
}


def _overload(dotted: str):
    packet, name = dotted.split(".")
    return getattr(getattr(aten, packet), name)


#: overloads autograd cannot differentiate (forward programs call the op's ``apply``)
WITHOUT_DERIVATIVE = {"copy.default"}


def declare_all() -> None:
    for op_name, spellings in TABLE.items():
        for dotted, adapter, inplace in spellings:
            declare_aten(_overload(dotted), op_name, adapter, inplace, differentiable=dotted not in WITHOUT_DERIVATIVE)


declare_all()
