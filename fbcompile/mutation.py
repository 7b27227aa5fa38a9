"""In-place writes in a captured graph: follow the ones fbcompile can, refuse the others.

fbcompile runs in-place ops out of place (:mod:`fbcompile.passes.forward`: no saved activation is
overwritten) and derives feedback only along the graph's edges. Both are exact when every later
reader of a written tensor reads the in-place node's result. Two things break that, silently:

1. torch.fx keeps the old proxy where the code keeps using the tensor it wrote:
   ``h.relu_(); return h * 2`` traces to ``mul(h, 2)``, beside a ``relu_`` node with no user.
   :func:`redirect_in_place_results` rewires such later readers to the in-place node (every
   in-place op returns the tensor it wrote), as torch.export does by itself.
2. A write through a view reaches its base, which the graph does not say: after
   ``h[:, :2].mul_(2)`` or ``h.view(...).add_(1)``, reads of ``h`` see the write, but ``h``'s
   node is unchanged; the same for ``h[:, 0] = v`` (``operator.setitem``, which returns nothing).

:class:`WriteCheck` finds every write exactly while the example inputs run: a node wrote a tensor
when its version counter moved (views share their base's counter). The write is harmless when no
later node reads memory it overlaps, except through the writing node itself. It is also harmless
when neither the writing node nor any such reader carries feedback: such nodes run as written, in
place (a shifted-window attention mask filled in by item assignment). Any other write is refused,
naming the node, the tensor read afterwards and its reader.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import FBCompileError

_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
              operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
              operator.irshift}


def returns_written_input(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` writes its first argument in place and returns it: a Tensor method or torch
    function ending in ``_`` (``relu_``, ``masked_fill_``), an augmented assignment (``h += x``),
    a function called with ``inplace=True``, or a torch.nn module built with ``inplace=True``."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return type(module).__module__.startswith("torch.nn.") and getattr(module, "inplace", False) is True
    if node.op != "call_function":
        return False
    target = node.target
    name = getattr(target, "__name__", "")
    if target in _AUGMENTED or (name.endswith("_") and not name.startswith("_")
                                and target in (getattr(torch, name, None), getattr(F, name, None))):
        return True
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def redirect_in_place_results(graph: fx.Graph, root: nn.Module) -> None:
    """Make every node that reads a tensor after an in-place write to it read the writing node
    (module docstring, case 1). Chains follow: after ``h.relu_(); h.mul_(2)`` the readers of ``h``
    read the ``mul_`` node, which reads the ``relu_`` node."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        written = node.args[0] if node.args else None
        if not isinstance(written, fx.Node) or not returns_written_input(node, root):
            continue
        for user in list(written.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(written, node)


class WriteCheck:
    """Finds the in-place writes of one run of a graph and refuses the unsafe ones (module
    docstring). :meth:`before` is called before each node runs, :meth:`after` after it, with the
    interpreter's environment of live values."""

    def __init__(self, graph: fx.Graph):
        self.order = {node: i for i, node in enumerate(graph.nodes)}

    def before(self, node: fx.Node, env: dict) -> list:
        """(input node, tensor, version) for every tensor ``node`` reads."""
        return [(source, t, t._version) for source in node.all_input_nodes for t in _tensors(env.get(source))]

    def after(self, node: fx.Node, read: list, env: dict, active) -> None:
        """Raise unless every write of ``node`` is harmless; ``active(n)``: whether node ``n``
        carries feedback (``node``'s own record is made before this call)."""
        for source, tensor, version in read:
            if tensor._version == version or not tensor.numel():
                continue
            readers = [other for other, value in env.items()
                       if other is not node and self._read_later(other, node)
                       and any(_overlap(tensor, t) for t in _tensors(value))]
            if readers and (active(node) or any(active(r) for r in readers)):
                raise FBCompileError(self._message(node, source, readers[0]))

    def _read_later(self, value_node: fx.Node, writer: fx.Node) -> bool:
        return any(self.order[user] > self.order[writer] for user in value_node.users)

    def _message(self, node: fx.Node, written: fx.Node, reader: fx.Node) -> str:
        from .trace import describe
        later = min((u for u in reader.users if self.order[u] > self.order[node]), key=self.order.get)
        shared = "it" if reader is written else f"{reader.name}, which shares its memory,"
        return (f"{describe(node)}\n  writes {written.name} in place, and {shared} is read afterwards by "
                f"{later.name}. fbcompile runs in-place ops out of place and follows a write only through the "
                "value the writing op returns, not through views or item assignment, so that read would see the "
                "value before the write and the gradient would be wrong. Write it out of place (torch.cat, "
                "torch.where, index_put, h = h * mask) so the graph says which value is read.")


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share an element of memory. Disjoint spans (first to last element
    reachable through the strides) answer at once; otherwise the elements of ``a`` are marked in a
    flag per element of the storage and ``b``'s are read (the columns of one chunk and of another
    interleave row by row without sharing any)."""
    if not b.numel() or a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a_start, a_end), (b_start, b_end) = _span(a), _span(b)
    if a_end <= b_start or b_end <= a_start:
        return False
    if a.element_size() != b.element_size():
        return True
    flags = torch.zeros(a.untyped_storage().nbytes() // a.element_size(), dtype=torch.bool, device=a.device)
    flags.as_strided(a.shape, a.stride(), a.storage_offset()).fill_(True)
    return bool(flags.as_strided(b.shape, b.stride(), b.storage_offset()).any())


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte of the storage ``t`` reaches."""
    start = t.storage_offset() * t.element_size()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()
