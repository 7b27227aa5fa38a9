"""Structure guard: the model's submodules, parameters and buffers are the objects captured.

A program holds the modules and tensors it captured. Replacing one on the model afterwards
(``model.fc = nn.Linear(512, 10)`` for transfer learning, ``layer.weight = nn.Parameter(...)``,
``load_state_dict(..., assign=True)``; ``.to()`` and ``.double()`` replace the buffers) left the
program training the old objects: the new head got no gradient, and the program's output differed
from the model's. :class:`StructureGuard` holds
every module's ``_modules``, ``_parameters`` and ``_buffers`` dicts (assignment replaces an entry
of one of them) and the identities of their entries at capture; its check, run with the other
guards before every step and every ``propagate_error``, raises when one changed. In-place changes
(``load_state_dict``, optimizer steps) keep the objects and pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

from torch import nn

from .errors import FBCompileError

META = "fbcompile_structure"


@dataclass(frozen=True, eq=False)
class StructureGuard:
    model_name: str
    dicts: tuple = field(repr=False)
    identities: tuple = field(repr=False)

    def check(self) -> None:
        """Raise :class:`FBCompileError` when a submodule, parameter or buffer was replaced, added or
        removed since compilation."""
        if _identities(self.dicts) != self.identities:
            raise FBCompileError(
                f"a submodule, parameter or buffer of {self.model_name} was replaced, added or removed since it was "
                "compiled (model.fc = nn.Linear(...), a new nn.Parameter, load_state_dict(assign=True), or .to(), "
                ".double(), .half(), which replace the buffers); the program still runs the captured objects, so the "
                "new ones would not be used or trained. Compile it again (after moving or converting the model)")


def structure_guard(model: nn.Module) -> StructureGuard:
    dicts = tuple(d for m in model.modules() for d in (m._modules, m._parameters, m._buffers))
    return StructureGuard(type(model).__name__, dicts, _identities(dicts))


def _identities(dicts) -> tuple:
    return tuple(map(id, chain.from_iterable(map(dict.values, dicts))))
