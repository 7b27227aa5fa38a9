"""The boxed calling convention of generated modules: ``module.forward(args)`` takes ONE list and
empties it before its first op.

fx's generated code drops every value right after its last reader (``h = None``), as autograd drops
each saved tensor right after its node's backward. For an input that frees nothing while the caller
still holds the tensor: the ``*args`` tuple of the call, the list it was built from, the learner's
taps. In the boxed convention the caller hands its references over: the generated function binds
each input it reads from the list (an input nothing reads is never bound) and clears the list, so
input i is freed right after its last reader in the graph. With inputs x_1..x_n whose last readers
are the ops at positions k_1..k_n, the live set after op k is {x_i : k_i > k} plus the values made
so far and still to be read -- the same as autograd's, where plain calling keeps all of x_1..x_n
alive until the module returns.
"""
from __future__ import annotations

from dataclasses import replace

from torch import fx

from ..errors import FBCompileError


class BoxedCodeGen(fx.graph.CodeGen):
    """``def forward(self, boxed): a = boxed[0]; c = boxed[2]; boxed.clear()`` followed by the
    usual body; ``read[i]`` says whether placeholder i has a reader."""

    def __init__(self, read: tuple):
        super().__init__()
        self.read = tuple(read)

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        if len(names) != len(self.read) or any(n.startswith("*") for n in names):
            raise FBCompileError(f"boxed calling convention: placeholders {names} do not match {len(self.read)} "
                                 "plain positional inputs")
        reads = [f"{name} = boxed[{i}]" for i, (name, read) in enumerate(zip(names, self.read)) if read]
        return (f"def {self._func_name}(self, boxed){maybe_return_annotation}:\n"
                f"    {'; '.join(reads + ['boxed.clear()'])}")

    def process_inputs(self, *args):
        return (list(args),)


def boxed(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` (sharing its attributes) that takes its inputs as one list, in
    placeholder order, and empties that list: call ``copy.forward(list_of_inputs)``."""
    graph = fx.Graph()
    env = {}
    for node in module.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:       # bind each input under its node's own name (no `name = target` alias)
        node.target = node.name
    graph.set_codegen(BoxedCodeGen(tuple(bool(n.users) for n in placeholders)))
    return fx.GraphModule(module, graph, class_name=f"{type(module).__name__}Boxed")


def with_boxed_module(record):
    """A copy of the dataclass ``record`` (e.g. a generated update graph) whose ``module`` is
    :func:`boxed`."""
    return replace(record, module=boxed(record.module))
