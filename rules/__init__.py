"""The feedback rule library: one module per op family. Importing it registers every rule."""
from . import activation, arith, conv, dropout, linear, norm, pool, reduce, structural  # noqa: F401
from . import softmax, sync_norm  # noqa: F401
from . import extreme, indexing  # noqa: F401
from . import attention, bilinear, embedding  # noqa: F401
from . import aten_ops, conv_transpose, elementwise, resample, selection, shaped_like  # noqa: F401
from . import adaptive_max_pool, fourier, fractional_pool, unpool, vjp_losses, vjp_math, vjp_ops  # noqa: F401
