"""Structure guard: the model's submodules, parameters and the buffers it reads are the objects captured.

A program holds the modules and tensors it captured. Replacing one on the model afterwards
(``model.fc = nn.Linear(512, 10)`` for transfer learning, ``layer.weight = nn.Parameter(...)``,
``load_state_dict(..., assign=True)``; ``.to()`` and ``.double()`` replace the buffers) left the
program training the old objects: the new head got no gradient, and the program's output differed
from the model's. :class:`StructureGuard` holds
every module's ``_modules`` and ``_parameters`` dicts (assignment replaces an entry of one of them)
and the identities of their entries at capture; its check, run with the other guards before every
step and every ``propagate_error``, raises when one changed. Buffers and plain tensor attributes
(:mod:`fbcompile.tensor_attributes`) are compared one by one, those the program reads: a buffer or
attribute the graph never reads (timm's ConViT builds its ``rel_indices`` buffer in forward, once
per sequence length, and torch.export computes it in the graph) may be replaced without changing
what the program computes. In-place changes (``load_state_dict``, optimizer steps) keep the objects
and pass.
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
    attributes: tuple = field(repr=False)       # (kind, qualified name, the dict holding it, name, tensor)

    def check(self) -> None:
        """Raise :class:`FBCompileError` when a submodule or parameter was replaced, added or removed
        since compilation, or a buffer or tensor attribute the program reads was replaced or deleted."""
        for kind, where, holder, name, tensor in self.attributes:
            if holder.get(name) is not tensor:
                raise FBCompileError(
                    f"{kind} {where} of {self.model_name} was replaced or deleted since it was compiled (.to(), "
                    ".double() and .half() replace buffers, so does load_state_dict(assign=True)); the program reads "
                    "the tensor object it captured, so it would compute with the old value. Change it in place "
                    "(with torch.no_grad(): ...copy_(new)), or compile again (after moving or converting the model)")
        if _identities(self.dicts) != self.identities:
            raise FBCompileError(
                f"a submodule or parameter of {self.model_name} was replaced, added or removed since it was "
                "compiled (model.fc = nn.Linear(...), a new nn.Parameter, load_state_dict(assign=True)); the program "
                "still runs the captured objects, so the new ones would not be used or trained. Compile it again")


def structure_guard(model: nn.Module, traced: fx.GraphModule) -> StructureGuard:
    """The guard of ``model``, whose captured graph is ``traced``. Of the buffers and plain tensor
    attributes it compares those the program reads: a ``get_attr`` of the graph, or a buffer of a
    module the graph calls (a ``call_module`` leaf, such as BatchNorm, reads its own). Not those
    forward itself assigns before use (the weight the old hook-based ``spectral_norm`` computes at
    each call, ConViT's position buffer)."""
    read = {id(value) for _, value in read_tensors(traced)}
    called = [traced.get_submodule(node.target) for node in traced.graph.nodes if node.op == "call_module"]
    read |= {id(buffer) for module in called for buffer in module.buffers()}
    dicts = tuple(d for m in model.modules() for d in (m._modules, m._parameters))
    attributes = tuple(("tensor attribute", where, vars(module), name, tensor)
                       for where, module, name, tensor in tensor_attributes(model) if id(tensor) in read)
    buffers = tuple(("buffer", f"{prefix}.{name}" if prefix else name, module._buffers, name, buffer)
                    for prefix, module in model.named_modules() for name, buffer in module._buffers.items()
                    if buffer is not None and id(buffer) in read)
    return StructureGuard(type(model).__name__, dicts, _identities(dicts), attributes + buffers)


def _identities(dicts) -> tuple:
    return tuple(map(id, chain.from_iterable(map(dict.values, dicts))))
