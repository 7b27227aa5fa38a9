"""The feedback rule library: one module per op family. Importing it registers every rule."""
from . import activation, arith, conv, dropout, linear, norm, pool, structural  # noqa: F401
