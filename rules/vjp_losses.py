"""Losses computed inside a model's forward (a model that returns its own loss, a regulariser or a
consistency term added to the output): ``F.mse_loss``, ``l1_loss``, ``smooth_l1_loss``,
``huber_loss``, ``cross_entropy``, ``nll_loss``, ``kl_div``, ``binary_cross_entropy`` (with
logits too), ``cosine_embedding_loss``, ``margin_ranking_loss``, ``soft_margin_loss``,
``hinge_embedding_loss`` and ``triplet_margin_loss``, and their ``nn`` modules.

The T rule is autograd's vjp at the saved inputs (:mod:`rules.vjp_ops`, kind "linearised"): every
active argument gets its share, a target computed from the model's activations included, and
integer class targets none. A reduced loss mixes the samples, so no call is batch-local.

Each op's ``apply`` is torch's own Python function, so a call binds exactly as torch binds it; the
ATen spellings (torch.export) pass ``reduction`` as 0, 1, 2, which the adapter maps back to
"none", "mean", "sum".
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule

from .vjp_ops import _refused_options, autograd_vjp, mixes_samples

#: loss function -> its nn module and the module attributes passed as arguments
LOSSES = {
    F.mse_loss: (nn.MSELoss, ("reduction",)), F.l1_loss: (nn.L1Loss, ("reduction",)),
    F.smooth_l1_loss: (nn.SmoothL1Loss, ("reduction", "beta")), F.huber_loss: (nn.HuberLoss, ("reduction", "delta")),
    F.cross_entropy: (nn.CrossEntropyLoss, ("weight", "ignore_index", "reduction", "label_smoothing")),
    F.nll_loss: (nn.NLLLoss, ("weight", "ignore_index", "reduction")),
    F.kl_div: (nn.KLDivLoss, ("reduction", "log_target")),
    F.binary_cross_entropy: (nn.BCELoss, ("weight", "reduction")),
    F.binary_cross_entropy_with_logits: (nn.BCEWithLogitsLoss, ("weight", "reduction", "pos_weight")),
    F.cosine_embedding_loss: (nn.CosineEmbeddingLoss, ("margin", "reduction")),
    F.margin_ranking_loss: (nn.MarginRankingLoss, ("margin", "reduction")),
    F.soft_margin_loss: (nn.SoftMarginLoss, ("reduction",)),
    F.hinge_embedding_loss: (nn.HingeEmbeddingLoss, ("margin", "reduction")),
    F.triplet_margin_loss: (nn.TripletMarginLoss, ("margin", "p", "eps", "swap", "reduction")),
}


def _module_arguments(names):
    return lambda m: {name: getattr(m, name) for name in names}


LOSS_OPS = [declare_op(function.__name__, function, functions=[function],
                       modules={module: _module_arguments(names)}, batch_local=mixes_samples)
            for function, (module, names) in LOSSES.items()]

for _op in LOSS_OPS:
    register_rule(_op, conditions="T", kind="linearised", supports=_refused_options)(autograd_vjp)
