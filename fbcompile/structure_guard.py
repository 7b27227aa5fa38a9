"""Structure guard: the model's submodules, parameters and buffers are the objects captured.

A program holds the modules and tensors it captured. Replacing one on the model afterwards
(``model.fc = nn.Linear(512, 10)`` for transfer learning, ``layer.weight = nn.Parameter(...)``,
``load_state_dict(..., assign=True)``; ``.to()`` and ``.double()`` replace the buffers) left the
program training the old objects: the new head got no gradient, and the program's output differed
from the model's. :class:`StructureGuard` holds
every module's ``_modules``, ``_parameters`` and ``_buffers`` dicts (assignment replaces an entry
of one of them) and the identities of their entries at capture; its check, run with the other
guards before every step and every ``propagate_error``, raises when one changed. Plain tensor
attributes (:mod:`fbcompile.tensor_attributes`) are compared the same way: a program reads the object
it captured. In-place changes (``load_state_dict``, optimizer steps) keep the objects and pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

from torch import fx, nn

from .errors import FBCompileError
from .tensor_attributes import read_tensors, tensor_attributes

META = "fbcompile_structure"


@dataclass(frozen=True, eq=False)
class StructureGuard:
    model_name: str
    dicts: tuple = field(repr=False)
    identities: tuple = field(repr=False)
    attributes: tuple = field(repr=False)       # (qualified name, module.__dict__, name, tensor)

    def check(self) -> None:
        """Raise :class:`FBCompileError` when a submodule, parameter or buffer was replaced, added or
        removed since compilation."""
        for where, attributes, name, tensor in self.attributes:
            if attributes.get(name) is not tensor:
                raise FBCompileError(
                    f"tensor attribute {where} of {self.model_name} was replaced or deleted since it was compiled; "
                    "the program reads the tensor object it captured, so it would compute with the old value. "
                    "Change it in place (with torch.no_grad(): ...copy_(new)), or compile again")
        if _identities(self.dicts) != self.identities:
            raise FBCompileError(
                f"a submodule, parameter or buffer of {self.model_name} was replaced, added or removed since it was "
                "compiled (model.fc = nn.Linear(...), a new nn.Parameter, load_state_dict(assign=True), or .to(), "
                ".double(), .half(), which replace the buffers); the program still runs the captured objects, so the "
                "new ones would not be used or trained. Compile it again (after moving or converting the model)")


def structure_guard(model: nn.Module, traced: fx.GraphModule) -> StructureGuard:
    """The guard of ``model``, whose captured graph is ``traced``. Of the plain tensor attributes it
    compares those the graph reads (a ``get_attr``), not those forward itself assigns before use (the
    weight the old hook-based ``spectral_norm`` computes at each call)."""
    read = {id(value) for _, value in read_tensors(traced)}
    dicts = tuple(d for m in model.modules() for d in (m._modules, m._parameters, m._buffers))
    attributes = tuple((where, vars(module), name, tensor) for where, module, name, tensor in tensor_attributes(model)
                       if id(tensor) in read)
    return StructureGuard(type(model).__name__, dicts, _identities(dicts), attributes)


def _identities(dicts) -> tuple:
    return tuple(map(id, chain.from_iterable(map(dict.values, dicts))))
