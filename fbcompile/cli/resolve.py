"""Turn command-line text into objects: models, input shapes, datasets, learner options, optimizers.

Everything here raises :class:`~fbcompile.errors.FBCompileError` (never a bare Python error) with a
message naming what is wrong, so the command can print it and exit 2 without a traceback.

MODEL specs: a built-in name (:data:`fbcompile.models.BUILTIN_MODELS`), ``path/to/file.py:Class``
or ``package.module:Class``. ``Class`` may be an ``nn.Module`` subclass or a function returning a
module; it receives ``input_shape`` and ``num_classes`` when its signature has them, plus the
``--model-option key=value`` pairs.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FBCompileError, OptionError, choices_text
from ..models import BUILTIN_MODELS, build_model

# Input shapes of the built-in models when neither a dataset nor --input-shape says otherwise.
DEFAULT_SHAPES = {"mlp": (784,), "lenet": (1, 32, 32), "vgg-simple": (3, 32, 32), "mixer": (3, 32, 32),
                  "resnet-small": (3, 32, 32), "resnet18": (3, 32, 32), "conv1d": (1, 40)}


def model_help() -> str:
    return f"{', '.join(BUILTIN_MODELS)}, path/to/file.py:Class or package.module:Class"


# -- small parsers --------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    """``"1,28,28"``, ``"1x28x28"`` or ``"(1, 28, 28)"`` -> ``(1, 28, 28)`` (no batch dimension)."""
    cleaned = str(text).strip().strip("()[]").replace("x", ",").replace(" ", "")
    try:
        shape = tuple(int(part) for part in cleaned.split(",") if part)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise OptionError(f"--input-shape {text!r} is not a shape; write it like 1,28,28 or 784 "
                          "(without the batch dimension)")
    return shape


def parse_value(text: str):
    """A Python literal (``0.5``, ``True``, ``None``, ``(1, 2)``, ``'x'``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(items, flag: str) -> dict:
    """``["beta=0.5", "feedback=ldrl"]`` -> ``{"beta": 0.5, "feedback": "ldrl"}``."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise OptionError(f"{flag} {item!r} is not of the form key=value (e.g. {flag} beta=0.5)")
        pairs[key] = parse_value(value.strip())
    return pairs


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise OptionError(f"{what} {text!r} is empty; give a comma-separated list")
    return items


# -- models ---------------------------------------------------------------------------------------
def model_factory(spec: str):
    """The callable a MODEL spec names: a built-in name, ``file.py:Class`` or ``module:Class``."""
    spec = str(spec).strip()
    if spec in BUILTIN_MODELS:
        return spec
    if ":" not in spec:
        raise OptionError(f"unknown model {spec!r}; use {model_help()}")
    location, _, attribute = spec.rpartition(":")
    if not attribute.isidentifier():
        raise OptionError(f"model {spec!r}: {attribute!r} after the ':' is not a class or function name")
    module = _import_file(location, spec) if _looks_like_path(location) else _import_module(location, spec)
    if not hasattr(module, attribute):
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        hint = f"; it defines {choices_text(found)}" if found else "; it defines no nn.Module subclass"
        raise OptionError(f"model {spec!r}: {location} has no attribute {attribute!r}{hint}")
    factory = getattr(module, attribute)
    if not callable(factory):
        raise OptionError(f"model {spec!r}: {attribute} is not a class or function")
    return factory


def _looks_like_path(location: str) -> bool:
    return location.endswith(".py") or "/" in location or "\\" in location


def _import_file(location: str, spec: str):
    path = Path(location).expanduser()
    if not path.is_file():
        raise OptionError(f"model {spec!r}: file {str(path)!r} does not exist")
    name = f"fbcompile_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module          # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise OptionError(f"model {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(location: str, spec: str):
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as exc:
        raise OptionError(f"model {spec!r}: no module named {location!r} (for a file write "
                          f"path/to/file.py:Class)") from exc
    except Exception as exc:
        raise OptionError(f"model {spec!r}: importing {location} failed: {type(exc).__name__}: {exc}") from exc


def default_input_shape(spec: str, factory=None) -> tuple | None:
    """The input shape of MODEL when no dataset or --input-shape gives one (None if unknown)."""
    if spec in DEFAULT_SHAPES:
        return DEFAULT_SHAPES[spec]
    shape = getattr(factory, "input_shape", None)
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
        return tuple(shape)
    return None


def build(spec: str, input_shape, num_classes: int, options: dict | None = None, *, seed: int = 0) -> nn.Module:
    """Instantiate MODEL for ``input_shape`` (no batch dim) and ``num_classes`` outputs, seeded."""
    factory, options = model_factory(spec), dict(options or {})
    torch.manual_seed(seed)
    if isinstance(factory, str):
        try:
            return build_model(factory, input_shape, num_classes, **options)
        except FBCompileError:
            raise
        except Exception as exc:
            raise OptionError(f"model {spec!r} cannot be built for input shape {tuple(input_shape)}: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
    kwargs = dict(options)
    accepted = accepted_keywords(factory)
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if accepted is None or name in accepted:
            kwargs.setdefault(name, value)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise OptionError(f"model {spec!r}: {getattr(factory, '__name__', spec)}(**{kwargs}) failed: "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise OptionError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def accepted_keywords(factory) -> set | None:
    """Names ``factory`` accepts as keywords (None when it takes **kwargs or has no signature)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_forward(model: nn.Module, example: torch.Tensor, spec: str) -> torch.Tensor:
    """Run the model once on ``example``; a failure becomes a message naming the input shape."""
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            output = model(example)
            model.train(was_training)
    except Exception as exc:
        raise OptionError(f"model {spec!r} does not accept inputs of shape {tuple(example.shape[1:])} "
                          f"(batch {example.shape[0]}): {type(exc).__name__}: {_first_line(exc)}; "
                          "pass --input-shape to change it") from exc
    if not isinstance(output, torch.Tensor):
        raise OptionError(f"model {spec!r} returns a {type(output).__name__}; training needs a single tensor output")
    return output


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- training pieces ------------------------------------------------------------------------------
def loss_for(task: str):
    """Cross-entropy for classification, mean squared error for regression."""
    return F.cross_entropy if task == "classification" else F.mse_loss


def algorithm_names() -> list[str]:
    """The registered algorithms, in registration order."""
    from ..runtime import ALGORITHMS
    return list(ALGORITHMS)


def check_algorithms(names) -> list[str]:
    known = algorithm_names()
    for name in names:
        if name not in known:
            raise OptionError(f"unknown algorithm {name!r}; use {choices_text(known)} "
                              "(see `fbcompile algorithms`)")
    return list(names)


def options_for(algorithm: str, options: dict) -> dict:
    """The subset of ``options`` that ``algorithm`` declares (for commands running several)."""
    from ..runtime import ALGORITHMS
    from ..runtime.base import COMMON_OPTIONS
    declared = {**COMMON_OPTIONS, **ALGORITHMS[algorithm].OPTIONS}
    return {k: v for k, v in options.items() if k in declared}


def learner_options(args) -> dict:
    """Learner options from ``--beta`` and ``--option key=value`` (validated later by the learner)."""
    options = parse_pairs(getattr(args, "option", None), "--option")
    if getattr(args, "beta", None) is not None:
        options["beta"] = args.beta
    return options
