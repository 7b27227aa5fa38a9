"""Writes to the model's buffers inside ``forward``: the ones a program keeps, and a refusal for the rest.

A buffer is model state: the forward of the model changes it as a side effect (BatchNorm's
running statistics, ``num_batches_tracked``), and a program must make the same change on every
forward it runs for a step, whichever learner and execution path runs it, and none while it only
analyses the model (:func:`fbcompile.trace.preserved_state`). Two writes are kept:

- running statistics, written by the normalisation op itself (a module call, or a functional
  ``F.batch_norm`` / ``aten.batch_norm`` / ``instance_norm`` on the module's buffers, as timm's
  ``BatchNormAct2d`` calls it);
- counters: an integer buffer incremented by a constant (``self.num_batches_tracked.add_(1)``).
  Each becomes one :func:`count_up` node, marked side-effectful, so that no pass that prunes the
  forward for an execution path drops it although nothing reads its result.

Any other write (``self.ema.mul_(0.9)``, ``self.buffer.copy_(x)``, ``self.mask[0] = 1``) is refused,
naming the node and the buffer: a program runs in-place ops out of place, and the learners' pruned
forwards would keep such a write on some paths and drop it on others.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import has_side_effect

from .errors import FBCompileError
from .tensor_attributes import state_tensors

aten = torch.ops.aten


@has_side_effect
def count_up(counter: torch.Tensor, amount) -> None:
    """``counter += amount`` in place: an integer buffer counting forward calls (side-effectful, so
    dead-code elimination keeps it although nothing reads its result)."""
    counter.add_(amount)


_ADDS = {"add_", aten.add_.Tensor, aten.add_.Scalar, operator.iadd}
_RUNNING_STATISTICS = {F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm, aten.batch_norm.default,
                       aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
                       aten.instance_norm.default}


def counter_increment(node: fx.Node, buffer_of) -> str | None:
    """The name of the integer buffer ``node`` increments by a constant number and whose result
    nothing reads (``self.counter.add_(1)``), else None. ``buffer_of(value)``: the (name, tensor)
    of the buffer an argument node is, else None."""
    target = node.target if node.op in ("call_function", "call_method") else None
    if target not in _ADDS or node.users or len(node.args) != 2 or node.kwargs:
        return None
    found = buffer_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    amount = node.args[1]
    if found is None or isinstance(amount, bool) or not isinstance(amount, int):
        return None
    name, tensor = found
    return name if not tensor.is_floating_point() and not tensor.is_complex() else None


def rewrite_counter_increments(graph: fx.Graph, buffer_of) -> None:
    """Replace every counter increment (:func:`counter_increment`) by a :func:`count_up` node."""
    for node in list(graph.nodes):
        if counter_increment(node, buffer_of) is not None:
            with graph.inserting_before(node):
                graph.call_function(count_up, tuple(node.args)).meta.update(node.meta)
            graph.erase_node(node)


def get_attr_buffer(root: nn.Module):
    """``buffer_of`` for a graph whose buffers are ``get_attr`` nodes of ``root``'s named buffers."""
    buffers = dict(root.named_buffers())

    def buffer_of(value: fx.Node):
        if value.op == "get_attr" and value.target in buffers:
            return value.target, buffers[value.target]
        return None
    return buffer_of


class BufferWrites:
    """Watches the buffers while the example inputs run: after each node, the ones whose version
    counter moved were written by it; a write that is neither a normalisation op's nor a counter's
    is refused (module docstring)."""

    def __init__(self, model: nn.Module):
        self.buffers = state_tensors(model)
        self.versions = [b._version for _, b in self.buffers]

    def after(self, node: fx.Node) -> None:
        written = []
        for i, (name, buffer) in enumerate(self.buffers):
            if buffer._version != self.versions[i]:
                written.append(name)
                self.versions[i] = buffer._version
        if written and not _keeps_write(node):
            from .trace import describe
            raise FBCompileError(
                f"{describe(node)}\n  writes buffer {written[0]!r} in place. A program keeps only BatchNorm's "
                "running statistics and counters (an integer buffer += a constant) among writes to model "
                "state: it runs in-place ops out of place, and a learner's execution path could drop the "
                "write. Update the buffer outside forward (e.g. after the optimizer step), or make it a "
                "BatchNorm module")


def _keeps_write(node: fx.Node) -> bool:
    return node.op == "call_module" or (node.op == "call_function" and (node.target is count_up
                                                                           or node.target in _RUNNING_STATISTICS))
