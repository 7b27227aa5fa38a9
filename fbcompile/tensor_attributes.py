"""Tensor attributes: tensors a module holds as plain attributes (``self.mask = torch.tril(...)``),
neither parameters nor registered buffers.

torch.fx sees only parameters and buffers as graph values. A plain tensor attribute is an ordinary
tensor to it: ``x * self.scale`` reads the object (in-place changes show), but whatever forward
computes from it alone (``self.scale.exp()``, ``self.mask[:n]``) runs once, while tracing, and is
a constant of the program from then on. Changing the attribute in place afterwards changed the
model but not the program: a silent difference. :func:`traced_as_buffers` registers them as
(non-persistent) buffers for the trace, so every read becomes a ``get_attr`` node read at each run,
and puts them back as they were. torch.export lifts them as constants it reads at each run.

Replacing one (``model.scale = torch.tensor(3.)``) leaves a program of either front end holding
the old object: the structure guard (:mod:`fbcompile.structure_guard`) compares their identities.
Writes to them in forward are refused like other buffer writes (:mod:`fbcompile.buffer_writes`),
but for counters. A tensor the graph reads that requires grad without being a parameter is refused
(:func:`refuse_untrained_tensors`): autograd trains it, a program would leave it out. Tensors held
in plain lists and dicts are :mod:`fbcompile.contained_tensors`'.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from .contained_tensors import storage_of, trainable_by_storage
from .errors import FBCompileError


def tensor_attributes(model: nn.Module) -> list:
    """``(qualified name, module, attribute name, tensor)`` of every plain tensor attribute."""
    found = []
    for qualname, module in model.named_modules():
        for name, value in vars(module).items():
            if torch.is_tensor(value) and not isinstance(value, nn.Parameter):
                found.append((f"{qualname}.{name}" if qualname else name, module, name, value))
    return found


def state_tensors(model: nn.Module) -> list:
    """``(name, tensor)`` of the model's buffers and plain tensor attributes: the tensors besides
    parameters that forward may read and, by mistake or by design, write."""
    return [*model.named_buffers(), *((name, tensor) for name, _, _, tensor in tensor_attributes(model))]


def read_tensors(traced: fx.GraphModule) -> list:
    """``(target, tensor)`` of every ``get_attr`` node of ``traced`` that reads a tensor."""
    found = []
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            value = traced
            for part in node.target.split("."):
                value = getattr(value, part)
            if torch.is_tensor(value):
                found.append((node.target, value))
    return found


def refuse_untrained_tensors(model: nn.Module, traced: fx.GraphModule) -> None:
    """Raise when the graph reads a tensor that requires grad but is not one of the model's
    parameters (``self.temperature = torch.tensor(1., requires_grad=True)``): autograd trains it,
    a program trains ``named_parameters()`` only, so it would be skipped silently."""
    params = {id(p) for p in model.parameters()}
    names = {id(t): name for name, t in state_tensors(model)}
    unregistered = trainable_by_storage(model, params)
    for target, tensor in read_tensors(traced):
        held = unregistered.get(storage_of(tensor)) if not tensor.requires_grad and storage_of(tensor) else None
        if (tensor.requires_grad and id(tensor) not in params) or held is not None:
            raise FBCompileError(
                f"{type(model).__name__}.forward reads {held or names.get(id(tensor), target)!r}, a tensor that "
                "requires grad but is not a parameter of the model: autograd would train it, a program trains only "
                "model.parameters(), so it would be left out silently. Register it as an nn.Parameter, or its "
                "module in an nn.ModuleList / nn.ModuleDict rather than a plain list or dict (or detach it, if it "
                "is not meant to learn)")


@contextlib.contextmanager
def traced_as_buffers(model: nn.Module):
    """Register every plain tensor attribute as a non-persistent buffer for the block (an fx trace),
    then restore each module's attribute to the object it held before.

    Yields a list that after the block holds ``(qualified name, value)`` for every parameter,
    buffer or tensor attribute that the block assigned (``self.steps += 1`` on a buffer proxy is
    ``self.steps = steps + 1`` to fx, which leaves the proxy in the module). Each is put back as it
    was, and so is every attribute the block set to a traced value (``self.last_attention = a``)."""
    moved = tensor_attributes(model)
    for _, module, name, tensor in moved:
        delattr(module, name)
        module.register_buffer(name, tensor, persistent=False)
    state = [(f"{qualname}.{name}" if qualname else name, entries, name, value)
             for qualname, module in model.named_modules() for entries in (module._parameters, module._buffers)
             for name, value in entries.items()]
    attributes = [(module, dict(vars(module))) for module in model.modules()]
    assigned = []
    try:
        yield assigned
    finally:
        for where, entries, name, value in state:
            if entries.get(name) is not value:
                assigned.append((where, entries.get(name)))
                entries[name] = value
        for module, before in attributes:
            for name, value in list(vars(module).items()):
                if isinstance(value, fx.Proxy):
                    if name in before:
                        vars(module)[name] = before[name]
                    else:
                        del vars(module)[name]
        for _, module, name, tensor in moved:
            module._buffers.pop(name, None)
            module._non_persistent_buffers_set.discard(name)
            vars(module)[name] = tensor
