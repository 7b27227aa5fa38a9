"""Data parallel on torch.distributed (gloo, 2 ranks on the CPU, spawned here).

The rank-side checks live in tests/test_distributed_worker.py; one launch of it (module fixture)
answers every learner test below, so the file stays around half a minute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("test_distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from test_distributed_worker import EQUAL, IDENTICAL  # noqa: E402

WORLD = 2


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("distributed")
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(directory / "init"),
                               str(directory)], cwd=directory, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = [process.communicate(timeout=300)[0] for process in ranks]
    assert all(p.returncode == 0 for p in ranks), "\n".join(log[-3000:] for log in logs)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _key(algo, options) -> str:
    return f"{algo}{options}"


@pytest.mark.parametrize("algo,options", EQUAL, ids=[_key(*case) for case in EQUAL])
def test_two_ranks_equal_one_process_on_the_whole_batch(report, algo, options):
    for rank in range(WORLD):
        found = report[rank]["equal"][_key(algo, options)]
        assert found["worst"] < 1e-5, (rank, found)
        if options.get("update") != "immediate":      # immediate applies its own steps (compared as params)
            assert found["compared"] > 0


@pytest.mark.parametrize("algo,options", IDENTICAL, ids=[_key(*case) for case in IDENTICAL])
def test_ranks_stay_bitwise_identical(report, algo, options):
    assert report[0]["identical"][_key(algo, options)] is True


@pytest.mark.parametrize("algo,options", [("drtp", {}), ("mf", {})])   # shallow: only the output unit updates
def test_update_unlocked_learners_launch_their_all_reduces_before_the_step_ends(report, algo, options):
    """With the overlap on, from the second step on (the first one records the bucket schedule every
    rank agrees on). On gloo it is off by default (it competes with the step for the CPU)."""
    assert report[0]["identical"][_key(algo, options) + " overlapped"] > 0
    assert report[0]["identical"]["default overlap"] is False


def test_a_step_failing_on_one_rank_raises_on_both_and_changes_nothing(report):
    cases = report[0]["failure"]
    assert len(cases) == 7
    for case, found in cases.items():
        for rank in range(WORLD):
            mine = report[rank]["failure"][case]
            assert mine["message"] is not None and "rank 1" in mine["message"], (case, rank, mine)
            assert "nothing was changed on any rank" in mine["message"]
            assert mine["unchanged"] and mine["after"], (case, rank, mine)
    assert "NonFiniteError" in cases["bp{}-nan"]["message"]
    assert "shapes cannot be multiplied" in cases["drtp{}-shape"]["message"]


@pytest.mark.parametrize("algo", ["drtp", "mf"])
def test_in_step_updates_on_two_ranks_equal_one_process_and_fail_together(report, algo):
    for rank in range(WORLD):
        found = report[rank]["in_step"][algo]
        assert found["worst"] < 1e-12 and found["moved"] > 1e-3, found
        assert found["message"] and "non-finite" in found["message"], found
        assert found["unchanged"] and found["identical"], found


def test_ranks_that_built_different_learners_are_refused_naming_the_difference(report):
    for rank in range(WORLD):
        message = report[rank]["fingerprint"]
        assert message is not None and "option projection_init" in message and "xavier_uniform" in message


def test_a_learner_does_not_keep_the_default_process_group_alive(report):
    for rank in range(WORLD):
        before, after = report[rank]["group_references"]
        assert after == before

@pytest.mark.parametrize("algo", ["bp", "dfa", "dtp"])
def test_sync_batchnorm_uses_global_statistics(report, algo):
    for rank in range(WORLD):
        found = report[rank]["sync_batchnorm"][algo]
        assert found["worst"] < 1e-10 and found["running_stats"] < 1e-10, (rank, found)


def test_checkpoint_from_two_ranks_resumes_at_two_and_at_one(report):
    zero, one = report[0]["resume"], report[1]["resume"]
    assert zero["identical"] and one["identical"] and zero["epochs"] == one["epochs"] == 2
    assert zero["history"] == [2, 2]
    assert zero["moved"] > 1e-3                      # the resumed epoch trained
    assert zero["worst"] < 1e-5                      # and both continuations agree


def test_torchrun_train_two_ranks_then_resume_at_one(tmp_path):
    from fbcompile.cli import main
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fbcompile", "train", "--data", "digits", "--subset", "128", "--epochs", "1",
               "--batch-size", "32", "--out", str(out), "--no-progress", "--no-plot", "--threads", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == 1 and done.stdout.count("digits: 128 train") == 1, done.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress", "--no-plot"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


def test_process_group_needs_an_initialised_torch_distributed():
    import torch
    import torch.distributed as dist

    import fbcompile
    from fbcompile.errors import OptionError
    assert not dist.is_initialized()
    program = fbcompile.compile(torch.nn.Linear(3, 2), torch.zeros(2, 3))
    with pytest.raises(OptionError, match="initialised first"):
        fbcompile.learner(program, "bp", process_group="world")
    assert fbcompile.learner(program, "bp", process_group=None).world_size == 1


LAUNCH_THEN_COMPILE = """
import os, sys, torch, fbcompile
from fbcompile.cli.runs import launched
assert "torch._dynamo" not in sys.modules        # else this check would not test the order of imports
def gloo_threads():
    names = (open(f"/proc/self/task/{task}/comm").read() for task in os.listdir("/proc/self/task"))
    return sum("gloo" in name for name in names)
with launched() as group:
    fbcompile.compile(torch.nn.Linear(3, 2), torch.zeros(2, 3))     # imports torch._dynamo
    print(gloo_threads())
print(gloo_threads())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names in /proc/self/task")
def test_a_launch_ends_with_gloos_threads_joined(tmp_path):
    """gloo's worker threads still running at interpreter exit can abort a rank (see launched())."""
    import socket
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, "-c", LAUNCH_THEN_COMPILE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    during, after = map(int, done.stdout.split())
    assert during > 0 and after == 0, f"{after} of gloo's {during} threads outlived destroy_process_group()"
