"""Reshapes that take the shape from another tensor: ``x.reshape_as(y)``, ``x.view_as(y)`` (LeViT).

J_F is the identity on the flattened entries, as for ``view``. T, P, I (exact): G(g) = g in the
input's shape. The other tensor gives only its shape (``shape_only``: no feedback, and a parameter
passed there learns nothing through it, as in autograd).
"""
from __future__ import annotations

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule


def reshape_as(input, other):
    return input.reshape(other.shape)


RESHAPE_AS = declare_op("reshape_as", reshape_as, methods=[tensor_method("reshape_as"), tensor_method("view_as")],
                        batch_local=lambda ctx: False, shape_only=("other",))


@register_rule(RESHAPE_AS, conditions="TPI")
def reshape_as_back(ctx, g):
    """G(g) = g viewed in the input's shape; none for the tensor whose shape was read."""
    return {"input": g.reshape(ctx.saved_shape("input"))}
