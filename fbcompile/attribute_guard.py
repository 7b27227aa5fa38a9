"""Attribute guard: the plain Python attributes of the model's modules are the values captured.

A capture evaluates ``forward``'s Python once, and the op bindings read module hyperparameters
once: ``if self.drop_prob == 0.`` (timm's DropPath), ``x / self.temperature``, a dropout's ``p`` or a
convolution's ``stride`` become constants of the program. Changing one on the model afterwards (a
drop-path or dropout schedule, an annealed temperature) changed what the model computes but not
what the program computes: a silent difference. :class:`AttributeGuard` holds, for every module,
the values at capture of its public attributes that are plain values (numbers, strings, None,
dtypes, devices and tuples of them; a list, which can change in place, is not one); its check,
run with the other guards before every step and every ``propagate_error``, raises naming the
first attribute that changed, its value then and now. An attribute assigned while the capture ran
forward is forward's own bookkeeping, set by forward before it is read (Hugging Face Funnel's
``pooling_mult = 1``, then doubled at each pooling): it is not guarded, since every eager call of
the model changes it again.
The training flag is the mode guard's (:mod:`fbcompile.mode_guard`); tensors, parameters and
submodules the structure guard's (:mod:`fbcompile.structure_guard`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import FBCompileError

META = "fbcompile_attributes"
_PLAIN = (bool, int, float, complex, str, type(None), torch.dtype, torch.device)
_MISSING = object()


@dataclass(frozen=True, eq=False)
class AttributeGuard:
    model_name: str
    keys: tuple = field(repr=False)        # (module.__dict__, module qualified name, attribute name)
    values: tuple = field(repr=False)

    def check(self) -> None:
        """Raise :class:`FBCompileError` when an attribute captured changed or was deleted."""
        now = tuple(attributes.get(name, _MISSING) for attributes, _, name in self.keys)
        if now == self.values:
            return
        (_, module, name), then, value = next((key, a, b) for key, a, b in zip(self.keys, self.values, now) if a != b)
        where = f"{module}.{name}" if module else name
        shown = "deleted" if value is _MISSING else f"{value!r}"
        raise FBCompileError(
            f"attribute {where} of {self.model_name} is {shown} but was {then!r} when the model was compiled. A "
            "program holds the values forward and the op bindings read at capture (a drop-path rate, a dropout "
            "probability, a temperature), so it would still compute with the old one. Compile it again after "
            "changing it")


@contextlib.contextmanager
def attributes_written(model: nn.Module):
    """Record, for the block (a capture, which runs forward's Python), the (module qualified name,
    attribute name) of every plain attribute assigned on ``model``'s modules: forward's own
    bookkeeping. (A capture may put the old value back afterwards, as torch.export does, so the
    values alone would not tell.)"""
    names = {id(module): qualname for qualname, module in model.named_modules()}
    written, assign = set(), nn.Module.__setattr__

    def recording(module, name, value):
        if id(module) in names and _plain(value):
            written.add((names[id(module)], name))
        assign(module, name, value)

    nn.Module.__setattr__ = recording
    try:
        yield written
    finally:
        nn.Module.__setattr__ = assign


def attribute_guard(model: nn.Module, written: set = frozenset()) -> AttributeGuard:
    """The guard of ``model`` after its capture, leaving out the attributes forward assigned during it
    (``written``, from :func:`attributes_written`)."""
    keys, values = [], []
    for qualname, module in model.named_modules():
        for name, value in vars(module).items():
            if not name.startswith("_") and name != "training" and _plain(value) and (qualname, name) not in written:
                keys.append((vars(module), qualname, name))
                values.append(value)
    return AttributeGuard(type(model).__name__, tuple(keys), tuple(values))


def _plain(value) -> bool:
    if isinstance(value, tuple):
        return all(map(_plain, value))
    return isinstance(value, _PLAIN)
