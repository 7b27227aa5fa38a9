"""``torch.compile`` of the generated feedback modules: ``fbcompile.compile(model, x, backend="inductor")``.

The feedback graphs fbcompile emits are plain fx modules run op by op from Python. On a real-size
convnet that per-op dispatch is a visible share of the step: measured on ResNet-18 (CPU, 2 threads,
batch 32, ``examples/bench_models.py --backend inductor``) the ``bp`` step went from 0.93x to 0.83x
autograd's time with its error-mode feedback module compiled by inductor, which took 25 s at the
first step. With a backend every feedback module an :class:`~fbcompile.executable.Executable` runs
(the error, target and unit modes of bp, fa, tp, dtp, ddtp and the others that go through
``run_feedback``) is wrapped in ``torch.compile(module, backend=...)`` when first used.

Costs, stated rather than hidden:

- compile time at the first step of each feedback mode, and again when the input shapes change
  (torch.compile then recompiles with dynamic shapes, once);
- memory: the compiled module is called with plain arguments, so the boxed calling convention
  (:mod:`fbcompile.passes.boxed`: each tap freed after its last reader) is lost; the taps live until
  the compiled graph returns (inductor frees its own intermediates);
- numerics: inductor fuses elementwise ops, so results equal the uncompiled program's to rounding,
  not bitwise.

Direct learners' own generated update modules (:mod:`fbcompile.runtime.direct_compiled`) are not
wrapped. A backend that fails to compile raises :class:`~fbcompile.errors.FBCompileError` naming the
backend and the feedback mode; the learner's step transaction leaves everything unchanged.
"""
from __future__ import annotations

from typing import Callable

from torch import fx

from .errors import FBCompileError, OptionError, choices_text


def check_backend(backend) -> str | Callable | None:
    """``backend`` if torch.compile knows it (a registered name or a callable), else OptionError."""
    if backend is None or callable(backend):
        return backend
    import torch._dynamo
    if not isinstance(backend, str) or backend not in torch._dynamo.list_backends(exclude_tags=()):
        usual = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})   # without debugging ones
        raise OptionError(f"backend={backend!r} is not a torch.compile backend; use None (run the generated "
                          f"feedback modules as Python) or one of {choices_text(tuple(usual))} "
                          "(torch._dynamo.list_backends(exclude_tags=()) lists all)")
    return backend


class CompiledFeedback:
    """A feedback module under ``torch.compile``, callable in the boxed convention of
    :mod:`fbcompile.passes.boxed` (``forward(list)`` empties the list before running)."""

    def __init__(self, module: fx.GraphModule, backend, mode: str):
        import torch._dynamo.exc      # not at import time: torch._dynamo is slow to import
        self.module, self.backend, self.mode = module, backend, mode
        self.compiled = torch.compile(module, backend=backend)
        self.compile_errors = torch._dynamo.exc.TorchDynamoException

    def forward(self, boxed: list):
        args = list(boxed)
        boxed.clear()
        try:
            return self.compiled(*args)
        except self.compile_errors as exc:
            raise FBCompileError(f"torch.compile backend {self.backend!r} failed on the {self.mode!r} feedback "
                                 f"module: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                 "compile the program without backend= to run it uncompiled") from exc
