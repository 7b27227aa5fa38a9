"""The training loop: metrics, atomic checkpoints, and resume == an uninterrupted run, bitwise."""
import json

import pytest
import torch

from fbcompile.cli import main
from fbcompile.cli.runs import RunConfig, build_run, load_data, trainer_for
from fbcompile.errors import FBCompileError
from fbcompile.training import Trainer, load_checkpoint, read_metrics

MLP = {"width": 16, "depth": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", subset=160)


def config(algorithm, **changes):
    values = dict(model="mlp", model_options=MLP, algorithm=algorithm, epochs=3, batch_size=32, subset=160,
                  optimizer="sgd", momentum=0.9, lr=0.05)
    values.update(changes)
    return RunConfig(**values)


def trained(cfg, digits, out_dir, epochs):
    trainer = trainer_for(build_run(cfg, digits), out_dir=out_dir, progress=False, log=None)
    trainer.fit(epochs)
    return trainer


def resumed(cfg, digits, out_dir, epochs):
    state = load_checkpoint(out_dir)
    trainer = trainer_for(build_run(RunConfig.from_dict(state["config"]), digits), out_dir=out_dir,
                          progress=False, log=None)
    trainer.restore(state)
    trainer.fit(epochs)
    return trainer


def assert_same_state(a: Trainer, b: Trainer):
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    for key in ("epoch",):
        assert getattr(a, key) == getattr(b, key)
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert strip(a.history) == strip(b.history)
    assert torch.equal(a.shuffle.get_state(), b.shuffle.get_state())
    assert torch.equal(torch.as_tensor(a.learner.generator.get_state()), torch.as_tensor(b.learner.generator.get_state()))


@pytest.mark.parametrize("algorithm,options", [
    ("bp", {}),
    ("fa", {}),
    ("dtp", {"feedback": "lrl"}),           # learned feedback: the learner's own optimizer state resumes too
    ("mf", {}),                             # class heads with their own optimizer
], ids=["bp", "fa", "dtp-lrl", "mf"])
def test_resume_equals_uninterrupted_run_bitwise(tmp_path, digits, algorithm, options):
    cfg = config(algorithm, options=options)
    straight = trained(cfg, digits, tmp_path / "straight", 3)
    trained(cfg, digits, tmp_path / "stopped", 1)
    again = resumed(cfg, digits, tmp_path / "stopped", 3)
    assert_same_state(straight, again)
    # and the parameters match the next step too: optimizer state (momentum) came back exactly
    records = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_interrupted_mid_epoch_resumes_from_last_checkpoint(tmp_path, digits, monkeypatch):
    """A crash inside epoch 2 leaves epoch 1's checkpoint intact (written atomically); resuming
    through the command line then reproduces the uninterrupted run."""
    out = tmp_path / "crash"
    argv = ["train", "--model", "mlp", "--model-option", "width=16", "--model-option", "depth=2", "--subset", "160",
            "--algo", "dtp", "--beta", "0.3", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "32",
            "--no-progress", "--no-plot"]
    assert main(argv + ["--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    from fbcompile.runtime.target import DifferenceTargetPropagation
    original, calls = DifferenceTargetPropagation.step, {"n": 0}

    def crash_in_epoch_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:                # 5 batches per epoch: the third batch of epoch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(DifferenceTargetPropagation, "step", crash_in_epoch_two)
    assert main(argv + ["--epochs", "3", "--out", str(out)]) == 130
    monkeypatch.setattr(DifferenceTargetPropagation, "step", original)
    assert load_checkpoint(out)["epoch"] == 1
    assert not list(out.glob("*.tmp"))
    assert main(["train", "--resume", str(out), "--no-progress", "--no-plot"]) == 0
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(out)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [r["test_loss"] for r in a["history"]] == [r["test_loss"] for r in b["history"]]
    assert len(read_metrics(out / "metrics.jsonl")) == 3


def test_resume_can_extend_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--model-option", "width=8", "--model-option", "depth=1", "--subset", "64",
            "--no-progress", "--no-plot"]
    assert main(argv + ["--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress", "--no-plot"]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_evaluate_and_metrics_records(digits):
    run = build_run(config("bp", optimizer="adam", lr=1e-2, momentum=0.0), digits)
    trainer = Trainer(run.learner, run.optimizer, digits, batch_size=32, progress=False, log=None)
    before = trainer.evaluate(digits.test_x, digits.test_y)
    history = trainer.fit(2)
    after = trainer.evaluate(digits.test_x, digits.test_y)
    assert after[0] < before[0] and 0.0 <= after[1] <= 1.0
    assert history[-1]["test_loss"] == pytest.approx(after[0])
    assert set(history[0]) >= {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}


def test_regression_has_no_accuracy():
    data = load_data("synthetic-regression", subset=64)
    run = build_run(RunConfig(model="mlp", model_options=MLP, data="synthetic-regression", algorithm="bp"), data)
    record = trainer_for(run, progress=False, log=None).run_epoch()
    assert record["train_accuracy"] is None and record["test_accuracy"] is None and record["test_loss"] > 0


def test_diagnostics_record_per_unit_angles(digits):
    run = build_run(config("fa", diagnostics=True), digits)
    record = trainer_for(run, progress=False, log=None).run_epoch()
    angles = [row["angle_bp"] for row in record["alignment"]]
    assert len(angles) == 3 and all(0 <= a <= 180 for a in angles)
    assert angles[-1] < 1e-3          # the output unit of FA gets the true gradient


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FBCompileError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FBCompileError, match="no epoch finished"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(FBCompileError, match="cannot read"):
        load_checkpoint(tmp_path / "bad")


def test_float16_training_scales_the_loss_and_resumes_its_scale_bitwise(tmp_path, digits):
    """--autocast float16 with a learner linear in the loss steps through a GradScaler, whose state
    (scale, growth tracker) is in the checkpoint: resuming equals the uninterrupted run."""
    cfg = config("dfa", autocast="float16")
    straight = trained(cfg, digits, tmp_path / "straight", 3)
    assert straight.scaler is not None and straight.history[-1]["train_loss"] < straight.history[0]["train_loss"]
    trained(cfg, digits, tmp_path / "stopped", 1)
    assert "scaler" in load_checkpoint(tmp_path / "stopped")
    again = resumed(cfg, digits, tmp_path / "stopped", 3)
    assert_same_state(straight, again)
    assert straight.scaler.state_dict() == again.scaler.state_dict()
    assert trained(config("dtp", autocast="float16", epochs=1), digits, tmp_path / "dtp", 1).scaler is None
