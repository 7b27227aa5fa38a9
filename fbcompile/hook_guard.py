"""Hook guard: module and parameter hooks either become part of the captured program or refuse it.

A hook changes what a module computes (a forward hook scaling the output, torch.nn.utils.prune's
pre-hook masking the weight, the old ``weight_norm``'s pre-hook) or what autograd does with a
gradient (backward hooks, ``Tensor.register_hook`` on a parameter). fbcompile's programs must
compute the model's function and its feedback must be autograd's, so:

- torch.fx does not run hooks: it traces ``forward`` and calls leaf modules as plain modules, so a
  forward hook would be missing from the graph (or run outside what the rules describe). The fx
  front end refuses a model with forward hooks, and ``frontend="auto"`` captures it with
  torch.export instead, which runs ``__call__`` and so traces the hooks' computation.
- torch.export traces forward hooks, except on the modules the export front end calls as modules
  (BatchNorm, Dropout: their hooks would run twice), which are refused.
- Backward hooks (module, global or on a parameter) are refused by both: compiled feedback does not
  run them, and a hook that edits a gradient would be ignored without a word. So is a gradient hook
  that ``forward`` registers on a tensor it computes (``h.register_hook(lambda g: -g)``, a gradient
  reversal written that way): torch.fx cannot trace the call, and torch.export traced it without
  recording it (:func:`tensor_hooks_refused`).

Hooks registered after compilation would change the model under the program: :class:`HookGuard`
records how many hooks of each kind every module and parameter had at capture, and its check (run
with the training-mode check before every step and every :meth:`propagate_error`) raises when that
changed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from .errors import FBCompileError, UntraceableModelError

META = "fbcompile_hooks"
FORWARD_KINDS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook"}
BACKWARD_KINDS = {"_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}
GLOBAL_KINDS = {"_global_forward_pre_hooks": "global forward pre-hook", "_global_forward_hooks": "global forward hook",
                "_global_backward_pre_hooks": "global backward pre-hook", "_global_backward_hooks": "global backward hook"}


def _count(hooks) -> int:
    return len(hooks) if hooks else 0


def forward_hooks(model: nn.Module) -> list[str]:
    """'<module>: <kind>' for every forward (pre-)hook on the model's modules."""
    return [f"{name or type(model).__name__}: {kind}" for name, m in model.named_modules()
            for attr, kind in FORWARD_KINDS.items() if _count(getattr(m, attr, None))]


def backward_hooks(model: nn.Module) -> list[str]:
    """Backward hooks on the model's modules, tensor hooks on its parameters, and global module hooks."""
    found = [f"{name or type(model).__name__}: {kind}" for name, m in model.named_modules()
             for attr, kind in BACKWARD_KINDS.items() if _count(getattr(m, attr, None))]
    found += [f"parameter {name}: gradient hook" for name, p in model.named_parameters()
              if _count(p._backward_hooks) or _count(getattr(p, "_post_accumulate_grad_hooks", None))]
    found += [kind for attr, kind in GLOBAL_KINDS.items() if _count(getattr(module_hooks, attr, None))]
    return found


def check_capturable(model: nn.Module, frontend: str) -> None:
    """Refuse what ``frontend`` cannot capture faithfully (module docstring)."""
    backward = backward_hooks(model)
    if backward:
        raise FBCompileError(f"{type(model).__name__} has hooks that compiled feedback would not run: "
                             f"{_listing(backward)}; remove them before compiling (a backward or gradient hook "
                             "would be ignored, and global module hooks change every module)")
    forward = forward_hooks(model)
    if forward and frontend == "fx":
        raise UntraceableModelError(f"torch.fx does not run module hooks, and {type(model).__name__} has "
                                    f"{_listing(forward)} (torch.export traces them: frontend='export' or 'auto')")


TENSOR_HOOKS = ("register_hook", "register_post_accumulate_grad_hook")
TENSOR_HOOK_REFUSAL = ("forward registers a gradient hook on a tensor (Tensor.register_hook), which a captured "
                       "program does not record: the feedback would leave out what the hook does to the gradient. "
                       "Write it as a module with a feedback rule, or remove the hook")


@contextlib.contextmanager
def tensor_hooks_refused(model_name: str):
    """Raise when the block (a torch.export capture of ``forward``) registers a gradient hook on a
    tensor: the exported program would not hold it."""
    def refuse(tensor, *args, **kwargs):
        raise UntraceableModelError(f"{model_name}.{TENSOR_HOOK_REFUSAL}")

    saved = {name: getattr(torch.Tensor, name) for name in TENSOR_HOOKS}
    try:
        for name in TENSOR_HOOKS:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def refuse_hooks_on_called_module(module: nn.Module, qualname: str) -> None:
    """The export front end calls BatchNorm and Dropout as modules: hooks on them would run twice."""
    for attr, kind in FORWARD_KINDS.items():
        if _count(getattr(module, attr, None)):
            raise FBCompileError(f"module {qualname} ({type(module).__name__}) has a {kind}; the torch.export "
                                 "front end calls this module itself, so the hook would run twice: remove it")


@dataclass(frozen=True, eq=False)
class HookGuard:
    """How many hooks the model had at capture. Registering a hook adds an entry to a dict the
    module already holds (and the module-level dicts of global hooks), so the guard holds those dict
    objects and a check is one C-level pass over their lengths; a parameter's gradient-hook dict is
    created on first use, so parameters are held and read one by one."""
    model_name: str
    hook_dicts: tuple = field(repr=False)
    parameters: tuple = field(repr=False)
    counts: tuple

    def check(self) -> None:
        """Raise :class:`FBCompileError` when a hook was added or removed since compilation."""
        if _counts(self.hook_dicts, self.parameters) != self.counts:
            raise FBCompileError(f"hooks of {self.model_name} changed since it was compiled; compile it again "
                                 "(a hook changes the model's function or its gradients, and the program was "
                                 "captured without it)")


def hook_guard(model: nn.Module) -> HookGuard:
    dicts = tuple(getattr(m, attr) for m in model.modules() for attr in (*FORWARD_KINDS, *BACKWARD_KINDS))
    dicts += tuple(getattr(module_hooks, attr) for attr in GLOBAL_KINDS)
    parameters = tuple(model.parameters())
    return HookGuard(type(model).__name__, dicts, parameters, _counts(dicts, parameters))


_GRADIENT_HOOKS = attrgetter("_backward_hooks")


def _counts(dicts, parameters) -> tuple:
    return tuple(map(len, dicts)), sum(1 for hooks in map(_GRADIENT_HOOKS, parameters) if hooks)


def _listing(found: list, first: int = 3) -> str:
    return ", ".join(found[:first]) + (f" and {len(found) - first} more" if len(found) > first else "")
