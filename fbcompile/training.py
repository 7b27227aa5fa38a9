"""The train/evaluate loop behind ``fbcompile train``, ``compare``, ``demo`` and the examples.

:class:`Trainer` runs epochs of ``learner.step`` + ``optimizer.step`` over a
:class:`~fbcompile.data.Dataset`, evaluates after every epoch and, when given a directory, keeps

- ``DIR/metrics.jsonl``: one JSON object per epoch (``epoch``, ``train_loss``, ``train_accuracy``,
  ``test_loss``, ``test_accuracy``, ``seconds``, and ``alignment``: per-unit angles to the BP
  gradient when ``diagnostics`` is on);
- ``DIR/checkpoint.pt``: written atomically (temporary file + ``os.replace``) after every epoch,
  holding the model, optimizer and learner state, every random state the loop uses (torch's
  global generator, the shuffling generator, numpy, Python's ``random``), the history and the
  caller's configuration. :meth:`Trainer.restore` continues exactly where the checkpoint was
  written: a resumed run is bitwise identical to an uninterrupted one.

Data parallel (the learner made with ``process_group=``, e.g. under ``torchrun``): ``batch_size``
is the global batch; every rank draws the same shuffled global batches (the shuffling generator is
seeded from the run's seed) and trains on its contiguous shard of each (``torch.tensor_split``, so
shards differ by at most one sample); the epoch's training loss and accuracy are summed over the
ranks; rank 0 alone evaluates, logs, writes metrics and checkpoints. A checkpoint does not depend on
the world size (the ranks are identical), so a run resumes at any number of processes.

A checkpoint holds only tensors, plain containers, numbers and strings, and is read back with
``torch.load(weights_only=True)`` (:func:`fbcompile.safe_load.load_torch_data`): loading one never runs
code, so a colleague's run can be resumed safely; a file that needs any other type is refused.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from .autocast_guard import mixed_precision
from .data import Dataset, batches
from .errors import DataError, FBCompileError
from .runtime.base import model_device
from .safe_load import load_torch_data

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FORMAT = 1
# The entries of a checkpoint and their types (checked on load, so a malformed file is one clear error).
CHECKPOINT_ENTRIES = {"format": int, "epoch": int, "config": dict, "history": list, "model": dict,
                      "optimizer": dict, "learner": dict, "rng": dict}
RNG_ENTRIES = ("torch", "shuffle", "numpy", "python")


class Trainer:
    """Train ``learner``'s model on ``dataset`` with ``optimizer`` (over the model's parameters).

    ``loss_fn`` defaults to cross-entropy (classification) or MSE (regression). ``predict`` is
    passed to ``learner.predict`` as keyword arguments (e.g. ``{"mode": "cumulative"}``).
    ``progress``: tqdm bars on stderr; ``log``: where the one-line epoch summaries go (None: nowhere).
    ``in_step_updates``: ``learner.step(..., optimizer=)`` applies the updates inside the step
    (:mod:`fbcompile.runtime.in_step`) instead of ``learner.step`` then ``optimizer.step()``.
    ``autocast``: a dtype name ("bfloat16", "float16"): every step, evaluation and diagnostic runs
    under ``torch.autocast`` on the model's device (the program must have been compiled under it:
    :mod:`fbcompile.autocast_guard`), each in its own context and the optimizer step outside, as
    torch.amp prescribes. In float16, learners whose updates are linear in the loss step with loss
    scaling (``self.scaler``, a ``torch.amp.GradScaler``: :mod:`fbcompile.runtime.loss_scaling`;
    not data parallel or with in-step updates), its state in the checkpoint.
    """

    def __init__(self, learner, optimizer, dataset: Dataset, *, loss_fn=None, batch_size: int = 64,
                 seed: int = 0, out_dir=None, config: dict | None = None, diagnostics: bool = False,
                 diagnostics_size: int = 64, predict: dict | None = None, progress: bool = True,
                 log=print, eval_batch_size: int = 1000, in_step_updates: bool = False,
                 autocast: str | None = None):
        import torch.nn.functional as F
        self.learner, self.optimizer, self.dataset = learner, optimizer, dataset
        self.model = learner.model
        self.loss_fn = loss_fn or (F.cross_entropy if dataset.task == "classification" else F.mse_loss)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.config = dict(config or {})
        self.diagnostics, self.diagnostics_size = diagnostics, diagnostics_size
        self.predict_options = dict(predict or {})
        self.progress, self.log = progress, log
        self.in_step_updates, self.autocast = in_step_updates, autocast
        if in_step_updates:
            from .runtime.in_step import check_can_apply
            check_can_apply(learner, optimizer)
        self.shuffle = torch.Generator().manual_seed(seed)
        self.epoch, self.history = 0, []
        self.classification = dataset.task == "classification"
        communicator = getattr(learner, "communicator", None)
        self.world = 1 if communicator is None else communicator.world
        self.rank = 0 if communicator is None else communicator.rank
        self.lead = self.rank == 0            # evaluates, logs and writes files
        self.scaler = None
        if autocast == "float16" and learner.linear_in_loss and not in_step_updates and self.world == 1:
            self.scaler = torch.amp.GradScaler(model_device(self.model).type)
        if not self.lead:
            self.out_dir, self.log, self.progress, self.diagnostics = None, None, False, False

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, epochs: int) -> list[dict]:
        """Train until ``epochs`` epochs are complete (counting those already done); the history."""
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        while self.epoch < epochs:
            record = self.run_epoch(epochs)
            if self.out_dir is not None:
                self.save()
                with open(self.out_dir / METRICS, "a") as stream:
                    stream.write(json.dumps(_json_safe(record)) + "\n")
            if self.log is not None:
                self.log(summary_line(record, epochs))
        return self.history

    def run_epoch(self, epochs: int | None = None) -> dict:
        """One epoch of training, then evaluation; the epoch's metrics record."""
        from tqdm.auto import tqdm
        self.model.train()
        data = self.dataset
        total = math.ceil(data.num_train / self.batch_size)
        loss_sum = correct = seen = 0
        start = time.perf_counter()
        label = f"epoch {self.epoch + 1}" + (f"/{epochs}" if epochs else "")
        with tqdm(total=total, desc=label, leave=False, disable=not self.progress, unit="batch") as bar:
            for xb, yb in batches(data.train_x, data.train_y, self.batch_size, shuffle=True, generator=self.shuffle):
                if self.world > 1:
                    xb, yb = torch.tensor_split(xb, self.world)[self.rank], torch.tensor_split(yb, self.world)[self.rank]
                self.optimizer.zero_grad(set_to_none=True)
                if self.in_step_updates:
                    with self.mixed_precision():
                        result = self.learner.step(xb, yb, self.loss_fn, optimizer=self.optimizer)
                else:
                    with self.mixed_precision():
                        result = self.learner_step(xb, yb)
                    self.optimizer_step()
                loss_sum += result.loss * len(xb)
                seen += len(xb)
                if self.classification and _scores(result.output, len(xb), data.num_classes):
                    correct += int((result.output.argmax(1) == yb).sum())
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}")
        seconds = time.perf_counter() - start
        if self.world > 1:      # a step's loss is the ranks' mean: sum_r loss * n_r = loss * N
            loss_sum, correct, seen = _summed_over_ranks(self.learner.communicator, loss_sum, correct, seen)
        self.epoch += 1
        record = {"epoch": self.epoch, "train_loss": loss_sum / max(seen, 1),
                  "train_accuracy": correct / seen if self.classification and seen else None}
        test_loss, test_accuracy = self.evaluate(data.test_x, data.test_y) if self.lead else (None, None)
        record.update(test_loss=test_loss, test_accuracy=test_accuracy, seconds=seconds)
        if self.diagnostics:
            record["alignment"] = self.alignment()
        self.history.append(record)
        return record

    def evaluate(self, x, y) -> tuple[float, float | None]:
        """(mean loss, accuracy or None for regression) of ``learner.predict`` on ``(x, y)``."""
        was_training = self.model.training
        self.model.eval()
        loss_sum = correct = 0.0
        try:
            with torch.no_grad(), self.mixed_precision():
                for start in range(0, len(x), self.eval_batch_size):
                    xb, yb = x[start:start + self.eval_batch_size], y[start:start + self.eval_batch_size]
                    scores = self.learner.predict(xb, **self.predict_options)
                    loss_sum += float(self.loss_fn(scores, yb)) * len(xb)
                    if self.classification:
                        correct += int((scores.argmax(1) == yb).sum())
        finally:
            self.model.train(was_training)
        return loss_sum / len(x), (correct / len(x) if self.classification else None)

    def alignment(self) -> list[dict]:
        """Per-unit angle (degrees) and norm ratio of the learner's update to the BP gradient, on
        the first ``diagnostics_size`` training samples; changes no state."""
        n = self.diagnostics_size
        with self.mixed_precision():
            report = self.learner.diagnostics(self.dataset.train_x[:n], self.dataset.train_y[:n], self.loss_fn)
        rows = getattr(report, "rows", [])
        keep = ("unit", "name", "angle_bp", "norm_ratio", "angle_gn", "feedback_angle")
        return [{k: row.get(k) for k in keep if k in row} for row in rows]

    def mixed_precision(self):
        """The torch.autocast context of one step, evaluation or diagnostic (none without ``autocast``)."""
        return mixed_precision(model_device(self.model).type, self.autocast)

    def learner_step(self, xb, yb):
        """``learner.step`` on one batch, with the loss scaler when there is one (a learner of the
        user's own may define ``step(inputs, targets, loss_fn)`` alone)."""
        if self.scaler is None:
            return self.learner.step(xb, yb, self.loss_fn)
        return self.learner.step(xb, yb, self.loss_fn, scaler=self.scaler)

    def optimizer_step(self) -> None:
        """The optimizer's step on the ``.grad`` a step wrote; with loss scaling, through the scaler
        (unscaled, skipped after an overflow) and the scale updated."""
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict:
        scaler = {} if self.scaler is None else {"scaler": self.scaler.state_dict()}   # optional entry
        return {
            "format": FORMAT, "epoch": self.epoch, "config": self.config, "history": self.history, **scaler,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "learner": self.learner.state_dict(),
            "rng": {"torch": torch.random.get_rng_state(), "shuffle": self.shuffle.get_state(),
                    "numpy": _numpy_state(), "python": random.getstate()},
        }

    def save(self) -> Path:
        """Write ``DIR/checkpoint.pt`` atomically: a crash leaves the previous checkpoint intact."""
        path = self.out_dir / CHECKPOINT
        temporary = path.with_name(path.name + ".tmp")
        torch.save(self.state(), temporary)
        os.replace(temporary, path)
        return path

    def restore(self, state: dict) -> None:
        """Load a checkpoint's state (from :func:`load_checkpoint`) into this trainer, its model,
        optimizer and learner, and rewrite ``metrics.jsonl`` to the checkpoint's history.

        A checkpoint that does not fit this run (another model's weights, a damaged random state) is
        a DataError; the trainer is then partly restored and should be discarded."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.learner.load_state_dict(state["learner"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            rng = state["rng"]
            torch.random.set_rng_state(rng["torch"])
            self.shuffle.set_state(rng["shuffle"])
            _set_numpy_state(rng["numpy"])
            random.setstate(rng["python"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            details = "; ".join(line.strip() for line in str(exc).splitlines()[:3] if line.strip())
            raise DataError(f"the checkpoint does not fit this run ({type(exc).__name__}: {details})") from exc
        self.epoch, self.history = state["epoch"], list(state["history"])
        if self.out_dir is not None:
            write_metrics(self.out_dir / METRICS, self.history)


def load_checkpoint(directory) -> dict:
    """The checkpoint of a ``fbcompile train`` output directory, read without running code.

    Raises FBCompileError if it is absent, DataError if it is unreadable or malformed, and
    UnsafeFileError (a DataError) if it asks for any type beyond tensors and plain data."""
    directory = Path(directory)
    path = directory / CHECKPOINT
    if not directory.is_dir():
        raise FBCompileError(f"cannot resume: directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise FBCompileError(f"cannot resume: {str(path)!r} does not exist (no epoch finished in that run)")
    state = load_torch_data(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not an fbcompile checkpoint (format {FORMAT})")
    wrong = [f"{key!r} should be {kind.__name__}, not {type(state.get(key)).__name__}"
             for key, kind in CHECKPOINT_ENTRIES.items() if not isinstance(state.get(key), kind)]
    if isinstance(state.get("rng"), dict):
        wrong += [f"'rng' lacks {key!r}" for key in RNG_ENTRIES if key not in state["rng"]]
    if wrong:
        raise DataError(f"{str(path)!r} is a damaged fbcompile checkpoint: {'; '.join(wrong)}")
    return state


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]


def write_metrics(path, history: list[dict]) -> None:
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as stream:
        for record in history:
            stream.write(json.dumps(_json_safe(record)) + "\n")
    os.replace(temporary, path)


def summary_line(record: dict, epochs: int | None = None) -> str:
    """``epoch 3/10  loss 0.4123  train 88.1%  test 86.0%  2.1s`` (plus the mean alignment angle)."""
    parts = [f"epoch {record['epoch']}" + (f"/{epochs}" if epochs else ""), f"loss {record['train_loss']:.4f}"]
    if record.get("train_accuracy") is not None:
        parts.append(f"train {100 * record['train_accuracy']:.1f}%")
    if record.get("test_accuracy") is not None:
        parts.append(f"test {100 * record['test_accuracy']:.1f}%")
    else:
        parts.append(f"test loss {record['test_loss']:.4f}")
    parts.append(f"{record['seconds']:.1f}s")
    angles = [r["angle_bp"] for r in record.get("alignment") or [] if r.get("angle_bp") is not None]
    if angles:
        parts.append(f"angle to BP {sum(angles) / len(angles):.1f} deg (mean of {len(angles)} unit"
                     f"{'s' if len(angles) > 1 else ''})")
    return "  ".join(parts)


def _summed_over_ranks(communicator, *values) -> tuple:
    """The sums over the ranks of ``values`` (one all-reduce)."""
    import torch.distributed as dist
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    staged = communicator._stage(total)
    dist.all_reduce(staged, group=communicator.group)
    values = staged.cpu().tolist()
    return values[0], int(round(values[1])), int(round(values[2]))


def _scores(output, batch: int, classes: int) -> bool:
    return isinstance(output, torch.Tensor) and output.shape == (batch, classes)


def _numpy_state():
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
            "has_gauss": has_gauss, "cached": cached}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["position"],
                         state["has_gauss"], state["cached"]))


def _json_safe(value):
    """Non-finite floats as strings ("nan", "inf"): metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
