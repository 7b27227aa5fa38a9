"""The feedback rule library: one module per op family. Importing it registers every rule."""
from . import activation, arith, conv, dropout, linear, norm, pool, structural  # noqa: F401
from . import softmax  # noqa: F401
from . import extreme, indexing  # noqa: F401
from . import attention, bilinear, embedding  # noqa: F401
