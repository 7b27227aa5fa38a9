"""Front ends: how a model becomes the traced GraphModule the compiler passes work on.

- ``"fx"``: ``torch.fx`` symbolic tracing (:mod:`fbcompile.capture`); nn modules with a declared op
  stay ``call_module`` nodes, functions and methods are matched by identity.
- ``"export"``: ``torch.export.export(..., strict=False)`` in training IR, in the model's current
  train/eval mode (:mod:`fbcompile.frontends.export`); ATen overloads are matched by identity through
  :mod:`fbcompile.aten_spellings`. The mode is part of the captured program: dropout and BatchNorm
  keep the mode they were exported in (BatchNorm modules stay the user's modules).
- ``"auto"`` (default): fx when it captures the model with every active node bound to a known op
  (a rule may still refuse one call: that refusal is the answer, as with ``frontend="fx"``);
  otherwise (fx fails, or keeps calls opaque such as fx-wrapped helpers) export when it captures
  the model with every node supported; otherwise the fx result (its unsupported nodes are what the
  user reads). A model neither can capture raises one FBCompileError with both reasons.

The choice and the reason are recorded in ``traced.meta["fbcompile_frontend"]`` as
``(frontend, note)``; ``explain()`` prints them.

Training mode: the chosen front end captures the model a second time with every module's training
flag flipped (:mod:`fbcompile.mode_guard`); where the two graphs differ the program is guarded
against running in another mode (``traced.meta["fbcompile_training_mode"]``). For torch.fx the
second trace costs a few milliseconds. For torch.export it is a second export (measured on CPU: +0.1 s
on a 0.23 s compile of a small CNN, +0.6 s on 0.8 s for a 4-layer nn.TransformerEncoder); it is paid
rather than always guarding, because an exported model whose only mode-dependent parts are
nn.Dropout / nn.BatchNorm modules runs in both modes with one program.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from .. import aten_spellings  # noqa: F401  (binds the ATen overloads)
from ..attribute_guard import META as ATTRIBUTE_META, attribute_guard, attributes_written
from ..autocast_guard import META as AUTOCAST_META, CapturedAutocast, autocast_state
from ..capture import capture, constant_arguments
from ..errors import FBCompileError, OptionError, UntraceableModelError, choices_text
from ..hook_guard import META as HOOK_META, check_capturable, hook_guard
from ..mode_guard import META as MODE_META, mode_guard
from ..structure_guard import META as STRUCTURE_META, structure_guard
from ..tensor_attributes import refuse_untrained_tensors
from ..trace import preserved_state
from .export import export_program, from_exported

FRONTENDS = ("auto", "fx", "export")
META = "fbcompile_frontend"


def check_frontend(frontend: str) -> None:
    if frontend not in FRONTENDS:
        raise OptionError(f"frontend={frontend!r} is not a front end; use {choices_text(FRONTENDS)}")


def frontend_of(traced: fx.GraphModule) -> tuple[str, str]:
    """(front end used, note) of a traced model; ``("fx", "")`` for one traced before front ends."""
    return getattr(traced, "meta", {}).get(META, ("fx", ""))


def capture_model(model: nn.Module, example_inputs: tuple, constants: dict | None, frontend: str,
                  analyse: Callable[[fx.GraphModule], list]) -> fx.GraphModule:
    """The traced GraphModule of ``model`` by ``frontend``. ``analyse(traced)`` runs propagation,
    canonicalization and rule selection and returns the unsupported nodes ("auto" uses it to choose).
    Its training-mode guard (None when the graph does not depend on the mode) is recorded in its meta."""
    refuse_wrappers(model)
    devices = _cuda_devices(model)
    with torch.random.fork_rng(devices=devices), attributes_written(model) as written:  # RNG as it was afterwards
        start = torch.random.get_rng_state()
        cuda_start = [torch.cuda.get_rng_state(d) for d in devices]
        traced = _choose(model, example_inputs, constants, frontend, analyse)
        if frontend_of(traced)[0] == "fx":
            recapture = lambda: capture(model, len(example_inputs), constants)
        else:
            recapture = lambda: capture_export(model, example_inputs, constants)
        torch.random.set_rng_state(start)      # a constant drawn at capture is drawn the same again,
        for device, state in zip(devices, cuda_start):          # on the model's GPUs too
            torch.cuda.set_rng_state(state, device)
        traced.meta[MODE_META] = mode_guard(model, traced, recapture)
    traced.meta[HOOK_META] = hook_guard(model)
    refuse_untrained_tensors(model, traced)
    traced.meta[STRUCTURE_META] = structure_guard(model, traced)
    traced.meta[ATTRIBUTE_META] = attribute_guard(model, written)
    traced.meta[AUTOCAST_META] = CapturedAutocast(type(model).__name__, autocast_state())
    return traced


#: wrapper module class -> (the attribute holding the wrapped module, what to do instead)
_WRAPPERS = {"OptimizedModule": ("_orig_mod", "torch.compile's wrapper; fbcompile captures the module itself "
                                              "(compile(..., backend=) compiles the feedback)"),
             "DataParallel": ("module", "torch.nn.DataParallel; fbcompile's learners run data parallel with "
                                        "learner(..., process_group=)"),
             "DistributedDataParallel": ("module", "DistributedDataParallel, whose gradient hooks a program would "
                                                   "not run; fbcompile's learners run data parallel with "
                                                   "learner(..., process_group=)")}


def refuse_wrappers(model: nn.Module) -> None:
    """Refuse a model wrapped for execution (torch.compile, DataParallel, DDP), naming the module to
    pass: neither front end can capture through the wrapper, and what it adds a learner does itself."""
    found = _WRAPPERS.get(type(model).__name__)
    if found is not None and isinstance(getattr(model, found[0], None), nn.Module):
        raise UntraceableModelError(f"{type(model).__name__} is {found[1]}: pass the module it wraps, "
                                    f"model.{found[0]}")


def _cuda_devices(model: nn.Module) -> list:
    return sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})


def _choose(model: nn.Module, example_inputs: tuple, constants: dict | None, frontend: str,
            analyse: Callable[[fx.GraphModule], list]) -> fx.GraphModule:
    check_frontend(frontend)
    given = len(example_inputs)
    if frontend == "fx":
        return _mark(capture(model, given, constants), "fx", "")
    if frontend == "export":
        return _mark(capture_export(model, example_inputs, constants), "export", "requested")
    fx_traced, fx_reason = None, ""
    try:
        fx_traced = capture(model, given, constants)
        problems = analyse(fx_traced)
    except FBCompileError as exc:
        fx_traced, fx_reason = None, str(exc)
    else:
        unknown = [p for p in problems if not p.canonical]
        if not unknown:     # captured, and every node is a known op (a rule may still refuse a call)
            return _mark(fx_traced, "fx", "")
        fx_reason = f"{len(unknown)} call(s) fx keeps opaque, first {unknown[0]}"
    try:
        exported = capture_export(model, example_inputs, constants)
        problems = analyse(exported)
    except FBCompileError as exc:
        if fx_traced is not None:
            return _mark(fx_traced, "fx", f"torch.export did not help: {_first_line(exc)}")
        raise UntraceableModelError(
            f"neither torch.fx nor torch.export could capture {type(model).__name__}:\n"
            f"- torch.fx: {fx_reason}\n- torch.export: {exc}") from exc
    if problems and fx_traced is not None:
        return _mark(fx_traced, "fx", f"torch.export leaves {len(problems)} node(s) without a rule as well")
    return _mark(exported, "export", f"torch.fx: {_first_line(fx_reason)}")


def capture_export(model: nn.Module, example_inputs: tuple, constants: dict | None) -> fx.GraphModule:
    """torch.export capture, mapped back onto the model's parameters and buffers."""
    check_capturable(model, "export")
    constant_arguments(model, len(example_inputs), constants or {})   # the same checks as fx
    try:
        with preserved_state(model):       # export runs forward's writes on plain tensor attributes
            exported = export_program(model, example_inputs, constants or {})
    except Exception as exc:   # noqa: BLE001  (export raises many types: UserError, GuardOnDataDependent, ...)
        raise UntraceableModelError(f"torch.export could not capture {type(model).__name__}: "
                                    f"{type(exc).__name__}: {_export_error_text(exc)}") from exc
    return from_exported(model, exported, len(example_inputs))


_USER_CALL = "The following call raised this error:"


def _export_error_text(exc) -> str:
    """The first lines of torch.export's message and, where it names one after them, the user's line
    that raised it (a data-dependent branch: HuBERT's ``if not skip_the_layer``)."""
    lines = str(exc).strip().splitlines()
    where = next((i for i, line in enumerate(lines) if line.strip() == _USER_CALL), None)
    if where is None:
        return "\n".join(lines[:12])
    return "\n".join(lines[:min(12, where)] + lines[where:where + 3])


def _first_line(exc) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _mark(traced: fx.GraphModule, frontend: str, note: str) -> fx.GraphModule:
    traced.meta[META] = (frontend, note)
    return traced
