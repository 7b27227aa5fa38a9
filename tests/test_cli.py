"""The `fbcompile` command: every subcommand through main(argv), exit codes, output, clean errors."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fbcompile.cli import main
from fbcompile.runtime import ALGORITHMS
from fbcompile.verify.report import VerifyReport

SMALL_MLP = ["--model", "mlp", "--model-option", "width=16", "--model-option", "depth=2", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nets(tmp_path):
    """A model file with a supported, an unsupported, an untraceable and a shape-taking model."""
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent("""
        import math
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.act, self.fc2 = nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))

        class ScaledErfc(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 3)
            def forward(self, x):
                return torch.special.bessel_j0(self.fc(x))

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 3)
            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return -self.fc(x)

        class ThreeWay(nn.Sequential):
            def __init__(self):
                super().__init__(nn.Flatten(), nn.Linear(64, 3))

        class Sized(nn.Module):
            def __init__(self, input_shape, num_classes=10, hidden=8):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.Tanh(),
                                         nn.Linear(hidden, num_classes))
            def forward(self, x):
                return self.net(x)
    """))
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# -- top level ----------------------------------------------------------------------------------
def test_help_and_missing_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "demo" in out and "verify" in out
    code, out, _ = run(capsys)
    assert code == 2 and "COMMAND" in out


def test_usage_error_is_one_message(capsys):
    code, _, err = run(capsys, "train", "--epochs", "many")
    assert_clean_error(code, err, "--epochs", "invalid int")


def test_algorithms_lists_the_registry(capsys):
    code, out, _ = run(capsys, "algorithms")
    assert code == 0
    assert all(name in out for name in ALGORITHMS)
    code, out, _ = run(capsys, "algorithms", "dtp")
    assert code == 0 and "beta" in out and "feedback" in out
    assert_clean_error(*run(capsys, "algorithms", "nope")[::2], "unknown algorithm 'nope'")


@pytest.mark.parametrize("algorithm", ["drtp", "ddtp-rhl", "mf-dd"])
def test_algorithms_prints_recommended_settings_with_sources(capsys, algorithm):
    from fbcompile.recommended import FAMILIES, recommended
    code, out, _ = run(capsys, "algorithms", algorithm)
    assert code == 0 and "Recommended settings" in out
    assert all(family in out for family in FAMILIES)
    for family in FAMILIES:
        for name, setting in recommended(algorithm, family).settings().items():
            assert name in out and setting.source in out


# -- recommended settings: precedence and provenance ----------------------------------------------
def test_train_uses_recommended_settings_and_records_their_sources(capsys, tmp_path):
    from fbcompile.recommended import recommended
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", *SMALL_MLP, "--algo", "drtp", "--epochs", "1", "--subset", "64",
                       "--no-progress", "--no-plot", "--out", str(out_dir))
    assert code == 0 and "settings:" in out
    config = json.loads((out_dir / "config.json").read_text())
    rec = recommended("drtp", "mlp")
    assert config["family"] == "fc"
    assert config["lr"] == rec.lr.value and config["provenance"]["lr"] == rec.lr.source
    assert config["optimizer"] == rec.optimizer.value and config["loss"] == "bce"
    assert config["provenance"]["loss"].startswith("paper 001")
    for name, setting in rec.options.items():
        assert config["options"][name] == setting.value
        assert config["provenance"][f"option.{name}"] == setting.source
    assert config["provenance"]["epochs"] == "user"


def test_user_values_override_the_recommendation(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", *SMALL_MLP, "--algo", "drtp", "--epochs", "1", "--subset", "64",
                       "--lr", "0.05", "--optimizer", "sgd", "--loss", "cross_entropy",
                       "--option", "batch_scaling=mean", "--no-progress", "--no-plot", "--out", str(out_dir))
    assert code == 0 and "lr=0.05 [user]" in out
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["lr"], config["optimizer"], config["loss"]) == (0.05, "sgd", "cross_entropy")
    assert config["options"]["batch_scaling"] == "mean"
    assert config["options"]["projection_init"] == "he_uniform"      # the rest stays recommended
    for key in ("lr", "optimizer", "loss", "option.batch_scaling"):
        assert config["provenance"][key] == "user"
    assert config["provenance"]["option.projection_init"] != "user"
    # resume keeps the resolved values and their provenance
    code, _, _ = run(capsys, "train", "--resume", str(out_dir), "--epochs", "2", "--no-progress", "--no-plot")
    assert code == 0
    assert json.loads((out_dir / "config.json").read_text())["provenance"] == config["provenance"]


def test_plain_tp_with_condition_t_is_warned_about(capsys, tmp_path):
    code, _, err = run(capsys, "train", *SMALL_MLP, "--algo", "tp", "--condition", "T", "--epochs", "1",
                       "--subset", "64", "--no-progress", "--no-plot", "--out", str(tmp_path / "tp"))
    assert "warning" in err and "condition T" in err and "--condition P" in err
    config = json.loads((tmp_path / "tp" / "config.json").read_text())
    assert config["condition"] == "T" and config["provenance"]["condition"] == "user"


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_prints_table_code_and_draws(capsys, tmp_path):
    png, dot = tmp_path / "g.png", tmp_path / "g.dot"
    code, out, _ = run(capsys, "inspect", "lenet", "--input-shape", "1,8,8", "--graph", str(png))
    assert code == 0
    assert "conv2d.transpose" in out and "def forward" in out and "unsupported nodes: none" in out
    assert png.stat().st_size > 10_000
    code, out, _ = run(capsys, "inspect", "mixer", "--data", "digits", "--no-code", "--graph", str(dot))
    assert code == 0 and "def forward" not in out
    text = dot.read_text()
    assert text.startswith("digraph") and "cluster_1" in text and "style=dashed" in text


def test_inspect_lists_unsupported_nodes(capsys, nets):
    code, out, _ = run(capsys, "inspect", f"{nets}:ScaledErfc")
    assert code == 1 and "special_bessel_j0" in out and "register_rule" in out


def test_inspect_user_model_with_input_shape(capsys, nets):
    code, out, _ = run(capsys, "inspect", f"{nets}:Sized", "--input-shape", "2,3", "--model-option", "hidden=4",
                       "--no-code")
    assert code == 0 and "net_1" in out


# -- verify -------------------------------------------------------------------------------------
def test_verify_table_and_json(capsys, nets):
    code, out, _ = run(capsys, "verify", "lenet", "--input-shape", "1,8,8")
    assert code == 0 and "tjml_rel" in out and "OK: all" in out
    code, out, _ = run(capsys, "verify", f"{nets}:Tiny", "--json")       # shape from the first Linear
    payload = json.loads(out)
    assert code == 0 and payload["ok"] and payload["dtype"] == "float64"
    assert {row["op"] for row in payload["rows"]} >= {"linear", "tanh"}


def test_verify_with_the_exact_statistics_variant(capsys):
    args = ("verify", "mixer", "--input-shape", "3,8,8", "--model-option", "patch=4", "--model-option", "dim=8",
            "--model-option", "hidden=8", "--json")
    kinds = {row["kind"] for row in json.loads(run(capsys, *args)[1])["rows"]}
    assert "frozen-statistics" in kinds
    code, out, _ = run(capsys, *args, "--variant", "exact-statistics")
    assert code == 0 and {row["kind"] for row in json.loads(out)["rows"]} == {"exact"}
    assert_clean_error(*run(capsys, "verify", "mlp", "--variant", "exakt")[::2], "unknown rule variant")


def test_verify_exits_1_when_an_exact_rule_is_off(capsys, monkeypatch):
    def wrong(program, inputs, **kwargs):
        return VerifyReport("Fake", "T", [{"level": "node", "node": "fc", "op": "linear", "rule": "r",
                                           "kind": "exact", "method": "dense", "n_in": 1, "n_out": 1,
                                           "tjml": 0.5, "tjml_rel": 0.5, "pjml": None, "ijml": None,
                                           "matching": 0.5}])
    monkeypatch.setattr("fbcompile.cli.verify.verify_program", wrong)
    code, out, _ = run(capsys, "verify", "mlp", "--input-shape", "4")
    assert code == 1 and "FAILED" in out and "fc" in out
    code, out, _ = run(capsys, "verify", "mlp", "--input-shape", "4", "--json")
    assert code == 1 and json.loads(out)["failures"] == ["fc"]


def test_verify_compile_errors_exit_2(capsys, nets):
    assert_clean_error(*run(capsys, "verify", f"{nets}:Branchy")[::2], "could not trace")
    code, _, err = run(capsys, "verify", f"{nets}:ScaledErfc")
    assert_clean_error(code, err, "special_bessel_j0")


# -- train (resume equality is in test_training.py) --------------------------------------------
def test_train_writes_metrics_checkpoint_and_plot(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", *SMALL_MLP, "--algo", "dtp", "--beta", "0.2", "--epochs", "2",
                       "--subset", "128", "--diagnostics", "--no-progress", "--out", str(out_dir))
    assert code == 0 and "epoch 2/2" in out and "angle to BP" in out
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_accuracy", "seconds", "alignment"):
        assert key in records[0]
    assert all(row["angle_bp"] < 1.0 for row in records[0]["alignment"])    # analytic DTP ~ BP
    assert (out_dir / "checkpoint.pt").exists() and (out_dir / "curves.png").exists()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["options"]["beta"] == 0.2 and config["provenance"]["option.beta"] == "user"
    # the directory holds a run now: a new run there is refused, --resume is the way on
    code, _, err = run(capsys, "train", *SMALL_MLP, "--out", str(out_dir))
    assert_clean_error(code, err, "--resume")
    code, _, err = run(capsys, "train", "--resume", str(out_dir), "--lr", "0.1")
    assert_clean_error(code, err, "--lr cannot change")
    code, out, _ = run(capsys, "train", "--resume", str(out_dir), "--no-progress")
    assert code == 0 and "already trained 2 of 2" in out


def test_resuming_a_model_from_a_file_needs_that_file_named_again(capsys, tmp_path):
    source = tmp_path / "digits_net.py"
    source.write_text("from torch import nn\n\nclass Net(nn.Sequential):\n    def __init__(self):\n"
                      "        super().__init__(nn.Flatten(), nn.Linear(64, 10))\n")
    out_dir, model = tmp_path / "run", f"{source}:Net"
    code, _, _ = run(capsys, "train", "--model", model, "--subset", "64", "--epochs", "1",
                     "--threads", "1", "--no-progress", "--no-plot", "--out", str(out_dir))
    assert code == 0
    code, _, err = run(capsys, "train", "--resume", str(out_dir), "--epochs", "2", "--no-progress", "--no-plot")
    assert_clean_error(code, err, "which is code", f"--model {model}")
    code, _, err = run(capsys, "train", "--resume", str(out_dir), "--model", "mlp", "--epochs", "2")
    assert_clean_error(code, err, f"--model {model}")
    code, out, _ = run(capsys, "train", "--resume", str(out_dir), "--model", model, "--epochs", "2",
                       "--no-progress", "--no-plot")
    assert code == 0 and "epoch 2/2" in out


def test_train_regression_and_generic_options(capsys, tmp_path):
    code, out, _ = run(capsys, "train", *SMALL_MLP, "--data", "synthetic-regression", "--subset", "64", "--algo",
                       "fa", "--option", "sign='usf'", "--epochs", "1", "--no-progress", "--no-plot",
                       "--out", str(tmp_path / "r"))
    assert code == 0 and "test loss" in out


@pytest.mark.parametrize("argv,fragments", [
    (["--model", "nosuchnet"], ["unknown model 'nosuchnet'", "mlp"]),
    (["--model", "missing/file.py:Net"], ["does not exist"]),
    (["--model", "no_such_module_xyz:Net"], ["no module named"]),
    (["--algo", "nope"], ["unknown algorithm 'nope'"]),
    (["--data", "imagenet"], ["unknown dataset 'imagenet'"]),
    (["--data", "mnist:/no/such/dir"], ["/no/such/dir", "does not exist"]),
    (["--model", "lenet", "--input-shape", "64"], ["--input-shape"]),
    (["--model", "lenet", "--model-option", "act='wobbly'"], ["activation='wobbly'"]),
    (["--algo", "dtp", "--option", "beta=-1"], ["beta=-1", "must be > 0"]),
    (["--algo", "dtp", "--option", "nonsense=1"], ["unknown option 'nonsense'"]),
    (["--algo", "bp", "--beta", "0.1"], ["'beta' does not apply to algorithm 'bp'"]),
    (["--option", "beta"], ["key=value"]),
    (["--input-shape", "a,b"], ["not a shape"]),
    (["--optimizer", "adam", "--momentum", "0.9"], ["momentum applies to sgd and rmsprop, not 'adam'"]),
    (["--lr", "0"], ["lr must be > 0, got 0"]),
])
def test_train_bad_input_is_one_clean_message(capsys, tmp_path, argv, fragments):
    code, _, err = run(capsys, "train", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "x"), *argv)
    assert_clean_error(code, err, *fragments)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_resume_of_a_missing_run(capsys):
    assert_clean_error(*run(capsys, "train", "--resume", "/no/such/run")[::2], "/no/such/run", "does not exist")


def test_untraceable_and_wrong_shape_user_models(capsys, nets, tmp_path):
    common = ["--epochs", "1", "--no-progress", "--out", str(tmp_path / "x")]
    assert_clean_error(*run(capsys, "inspect", f"{nets}:Branchy", "--input-shape", "6")[::2], "control flow")
    assert_clean_error(*run(capsys, "train", "--model", f"{nets}:Tiny", *common)[::2],
                       "does not accept inputs of shape (1, 8, 8)")
    assert_clean_error(*run(capsys, "train", "--model", f"{nets}:ThreeWay", *common)[::2],
                       "returns shape (2, 3)", "digits has 10 classes")


def test_unexpected_errors_are_one_line_unless_asked(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something broke")
    monkeypatch.setattr("fbcompile.cli.algorithms.run", broken)
    code, _, err = run(capsys, "algorithms")
    assert code == 1 and "unexpected RuntimeError: something broke" in err and "Traceback" not in err
    monkeypatch.setenv("FBCOMPILE_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["algorithms"])


# -- compare and bench --------------------------------------------------------------------------
def test_compare_table_and_plot(capsys, tmp_path):
    out_dir = tmp_path / "cmp"
    code, out, _ = run(capsys, "compare", *SMALL_MLP, "--algos", "bp,dtp:beta=0.5", "--seeds", "2", "--epochs", "1",
                       "--subset", "96", "--no-progress", "--out", str(out_dir))
    assert code == 0 and "+-" in out and "dtp:beta=0.5" in out
    assert (out_dir / "compare.png").exists() and (out_dir / "curves.png").exists()
    payload = json.loads((out_dir / "compare.json").read_text())
    assert payload["configs"]["dtp:beta=0.5"]["provenance"]["option.beta"] == "user"
    assert payload["configs"]["bp"]["provenance"]["lr"].startswith(("paper", "ours"))
    assert len(payload["histories"]["bp"]) == 2
    code, _, err = run(capsys, "compare", *SMALL_MLP, "--algos", "bp,fa", "--beta", "0.5", "--out", str(out_dir))
    assert_clean_error(code, err, "'beta' applies to none")


def test_bench_table_and_json(capsys):
    argv = ["bench", *SMALL_MLP, "--input-shape", "12", "--algos", "bp,dtp", "--rounds", "2", "--warmup", "1",
            "--batch-size", "16"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "autograd" in out and "x autograd" in out and "peak MB" in out
    code, out, _ = run(capsys, *argv, "--no-memory", "--json")
    rows = json.loads(out)["results"]
    assert code == 0 and [r["configuration"] for r in rows] == ["autograd", "bp", "dtp"]
    assert rows[0]["x autograd"] == 1.0
    code, out, _ = run(capsys, *argv, "--no-memory", "--backend", "eager")     # feedback under torch.compile
    assert code == 0 and "dtp" in out
    code, _, err = run(capsys, *argv, "--no-memory", "--backend", "no-such-backend")
    assert_clean_error(code, err, "not a torch.compile backend")


# -- demo ---------------------------------------------------------------------------------------
def test_demo_quick(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, _ = run(capsys, "demo", "--quick", "--jobs", "1", "--algos", "bp,dtp,drtp", "--out", str(out_dir))
    assert code == 0
    assert "TJML-DTP" in out and "Jacobian matching: OK" in out and "MLP-Mixer" in out
    for name in ("accuracy.png", "curves-lenet.png", "graph-mixer.png", "results.json", "results.md"):
        assert (out_dir / name).exists(), name


# -- real processes -----------------------------------------------------------------------------
def test_python_dash_m_and_console_script_fail_cleanly(tmp_path):
    # cwd outside the checkout: from the repository root, `python -m` would import the source tree,
    # which lacks fbcompile/rules when the package is installed non-editable.
    done = subprocess.run([sys.executable, "-m", "fbcompile", "verify", "resnet99"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown model 'resnet99'" in done.stderr and "Traceback" not in done.stderr
    script = subprocess.run([str(Path(sys.executable).parent / "fbcompile"), "algorithms"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert script.returncode == 0 and "drtp" in script.stdout
