"""Contained tensors: tensors a module holds inside plain Python lists, tuples and dicts (``self.masks
= [m1, m2]``, a layer in a plain list), neither registered nor plain tensor attributes.

Neither front end sees them as model state. torch.fx reads them as ordinary tensors: ``x *
self.masks[0]`` reads the object (in-place changes show), but whatever forward computes from one
alone (``self.masks[0].float()``, ``.exp()``, ``.item()``) runs once, at trace time, and the program
keeps that value after the tensor changes in place: :func:`eager_reads_refused` refuses such a trace,
naming the tensor and the op (``frontend="auto"`` then captures with torch.export). torch.export
lifts each as a detached alias of its memory, read at every run; a trainable one would get no
gradient, which :func:`fbcompile.tensor_attributes.refuse_untrained_tensors` refuses by finding it
from that memory (:func:`trainable_by_storage`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .errors import UntraceableModelError

#: reads of a tensor's metadata, not its values: the same after any in-place change
_METADATA = {"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "size", "dim", "numel",
             "stride", "is_contiguous", "is_floating_point", "is_complex", "element_size", "__len__"}


def contained_tensors(model: nn.Module) -> list:
    """``(where, tensor)`` of every tensor in the plain lists, tuples and dicts (nested up to three
    deep) of the model's modules' public attributes, and every parameter of a module held there."""
    found = []

    def visit(value, where, depth):
        if isinstance(value, nn.Module):
            found.extend((f"{where}.{name}", p) for name, p in value.named_parameters())
        elif torch.is_tensor(value):
            found.append((where, value))
        elif depth < 3 and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{where}[{i}]", depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{where}[{key!r}]", depth + 1)

    for qualname, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, (list, tuple, dict)) and not name.startswith("_"):
                visit(value, f"{qualname}.{name}" if qualname else name, 0)
    return found


def trainable_by_storage(model: nn.Module, params: set) -> dict:
    """{storage address: where} of the contained tensors that require grad and are not among
    ``params`` (ids): torch.export lifts them as detached aliases, so only their memory tells them apart."""
    found = {}
    for where, tensor in contained_tensors(model):
        if tensor.requires_grad and id(tensor) not in params and storage_of(tensor):
            found.setdefault(storage_of(tensor), where)
    return found


def storage_of(tensor: torch.Tensor) -> int:
    """The address of a tensor's memory (0 where it has none to compare)."""
    return tensor.untyped_storage().data_ptr() if tensor.layout == torch.strided and tensor.device.type != "meta" else 0


class _EagerReads(TorchFunctionMode):
    """Raises at a torch op that reads a watched tensor's values with no traced value among its
    arguments: fx runs it for real, once."""

    def __init__(self, watched: dict, model_name: str):
        super().__init__()
        self.watched, self.model_name = watched, model_name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        name = getattr(getattr(func, "__self__", None), "__name__", "") if func.__name__ == "__get__" else func.__name__
        if name not in _METADATA and not any(isinstance(a, fx.Proxy) for a in leaves):
            where = next((self.watched[id(a)] for a in leaves if torch.is_tensor(a) and id(a) in self.watched), None)
            if where is not None:
                raise UntraceableModelError(
                    f"{self.model_name}.forward computes {name} on {where}, a tensor held in a plain list or dict: "
                    "torch.fx runs that once, at trace time, so the program would keep the value after the tensor "
                    "changes. Register it as a buffer (or use frontend='export', which reads it at every run)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def eager_reads_refused(model: nn.Module):
    """For the block (an fx trace), refuse ops that read the values of contained tensors (module
    docstring). Registered parameters and buffers held in a container too are graph values: left out."""
    registered = {id(t) for t in (*model.parameters(), *model.buffers())}
    watched = {id(t): where for where, t in contained_tensors(model) if id(t) not in registered}
    if not watched:
        yield
        return
    with _EagerReads(watched, type(model).__name__):
        yield
