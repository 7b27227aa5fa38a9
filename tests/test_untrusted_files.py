"""Files from elsewhere never run code (issue 17).

Checkpoints and CIFAR-10 batches crafted so that unpickling them creates a marker file are refused
through the Python API and the command line (exit 2, one message, no traceback) and the marker never
appears; damaged and truncated files are one clear DataError; genuine files still load.
"""
import codecs
import pickle
import pickletools
import shutil

import numpy as np
import pytest
import torch

from fbcompile.cli import main
from fbcompile.data.cifar import BATCH_GLOBALS, load_cifar10
from fbcompile.errors import DataError, UnsafeFileError
from fbcompile.training import CHECKPOINT, METRICS, load_checkpoint, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
QUIET = ["--no-progress", "--no-plot"]


class CreatesMarker:
    """Unpickling this object calls ``open(marker, "w")``: the marker file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Reduces:
    """Pickles as ``function(*args)``: a way to write calls the CIFAR allow-list must refuse."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def cifar_batch(n, rng, name="data_batch_1"):
    """A batch as the CIFAR-10 python version holds it: uint8 data, int labels, label, file names."""
    return {b"batch_label": f"{name} of the test set".encode(), b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"image_{i:04d}.png".encode() for i in range(n)]}


def write_cifar_dir(directory, protocol=2, seed=0, n=3):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {name: cifar_batch(n, rng, name) for name in CIFAR_BATCHES}
    for name, batch in batches.items():
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


def globals_named(pickled: bytes) -> set:
    """The ``(module, name)`` pairs a protocol-2 pickle imports, read from its GLOBAL opcodes."""
    opcodes = list(pickletools.genops(pickled))
    assert "STACK_GLOBAL" not in {opcode.name for opcode, _, _ in opcodes}     # protocol 4 and later
    return {tuple(argument.split(" ")) for opcode, argument, _ in opcodes if opcode.name == "GLOBAL"}


class RecordingUnpickler(pickle.Unpickler):
    """A plain unpickler (for our own files only) that records the globals it resolves."""

    def find_class(self, module, name):
        self.resolved = getattr(self, "resolved", set()) | {(module, name)}
        return super().find_class(module, name)


def run_cli(argv, capsys):
    """``fbcompile ARGV``: (exit status, stderr lines)."""
    status = main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def assert_one_message(status, lines, *fragments):
    assert status == 2
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "unexpected" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def genuine_run(tmp_path_factory):
    """A one-epoch ``fbcompile train`` run directory (an MLP on 160 digits)."""
    directory = tmp_path_factory.mktemp("runs") / "genuine"
    status = main(["train", "--model", "mlp", "--model-option", "width=8", "--model-option", "depth=1",
                   "--subset", "160", "--epochs", "1", "--lr", "0.01", "--out", str(directory), *QUIET])
    assert status == 0
    return directory


@pytest.fixture
def run_copy(genuine_run, tmp_path):
    """A private copy of the genuine run, free to be damaged."""
    return shutil.copytree(genuine_run, tmp_path / "run")


def crafted_checkpoint(run_dir, marker):
    """The genuine checkpoint with a payload object in its config, saved as fbcompile saves."""
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    state["config"]["model_options"] = CreatesMarker(marker)
    torch.save(state, run_dir / CHECKPOINT)


def test_the_payloads_are_live(run_copy, tmp_path):
    """Control: the crafted files do run code when read the unsafe way, so the refusals below can fail."""
    crafted_checkpoint(run_copy, tmp_path / "checkpoint-ran")
    torch.load(run_copy / CHECKPOINT, weights_only=False)
    assert (tmp_path / "checkpoint-ran").exists()
    batch = pickle.dumps({b"data": CreatesMarker(tmp_path / "batch-ran"), b"labels": []}, protocol=2)
    pickle.loads(batch, encoding="bytes")
    assert (tmp_path / "batch-ran").exists()


def test_crafted_checkpoint_is_refused_by_the_api(run_copy, tmp_path):
    marker = tmp_path / "marker"
    crafted_checkpoint(run_copy, marker)
    with pytest.raises(UnsafeFileError, match=r"refused to load checkpoint .*checkpoint\.pt.* (_?io|builtins)\.open"):
        load_checkpoint(run_copy)
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_by_train_resume(run_copy, tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted_checkpoint(run_copy, marker)
    status, lines = run_cli(["train", "--resume", str(run_copy), "--epochs", "2", *QUIET], capsys)
    assert_one_message(status, lines, "fbcompile train: error: refused to load checkpoint", str(run_copy / CHECKPOINT),
                       "open")
    assert not marker.exists()
    assert len(read_metrics(run_copy / METRICS)) == 1       # nothing trained on


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bit_rot(data: bytes) -> bytes:
    """The last 64 bytes of tensor data inverted: torch alone would load them without a word."""
    start = data.rindex(b"PK\x03\x04") - 64
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:]


def _random_bytes(data: bytes) -> bytes:
    return np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()


def _empty(data: bytes) -> bytes:
    return b""


def _bytes_changed(transform):
    """Damage a file by rewriting its bytes with ``transform``."""
    return lambda path: path.write_bytes(transform(path.read_bytes()))


def _resaved(change):
    """Damage a checkpoint by loading it, applying ``change`` to its state and saving it again."""
    def damage(path):
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return damage


DAMAGED_CHECKPOINTS = {
    "truncated": (_bytes_changed(_truncated), "cannot read checkpoint"),
    "empty": (_bytes_changed(_empty), "cannot read checkpoint"),
    "random bytes": (_bytes_changed(_random_bytes), "cannot read checkpoint"),
    "bit rot in a tensor": (_bytes_changed(_bit_rot), "fails the CRC check"),
    "not a checkpoint": (_resaved(lambda state: state.pop("format")), "is not an fbcompile checkpoint"),
    "config not a dict": (_resaved(lambda state: state.update(config=["mlp"])), "'config' should be dict, not list"),
    "rng state missing": (_resaved(lambda state: state["rng"].pop("numpy")), "'rng' lacks 'numpy'"),
}


@pytest.mark.parametrize("damage", DAMAGED_CHECKPOINTS)
def test_damaged_checkpoint_is_one_clear_error(run_copy, damage, capsys):
    change, expected = DAMAGED_CHECKPOINTS[damage]
    change(run_copy / CHECKPOINT)
    with pytest.raises(DataError, match=expected):
        load_checkpoint(run_copy)
    status, lines = run_cli(["train", "--resume", str(run_copy), *QUIET], capsys)
    assert_one_message(status, lines, expected, str(run_copy / CHECKPOINT))


def test_checkpoint_of_another_model_does_not_fit(run_copy, capsys):
    state = torch.load(run_copy / CHECKPOINT, weights_only=True)
    state["model"] = {name: torch.randn(3, 3) for name in state["model"]}
    torch.save(state, run_copy / CHECKPOINT)
    status, lines = run_cli(["train", "--resume", str(run_copy), "--epochs", "2", *QUIET], capsys)
    assert_one_message(status, lines, "does not fit this run", "size mismatch")


def test_genuine_checkpoint_loads_and_resumes(run_copy, capsys):
    state = load_checkpoint(run_copy)
    assert state["epoch"] == 1 and state["config"]["model_options"] == {"width": 8, "depth": 1}
    assert main(["train", "--resume", str(run_copy), "--epochs", "2", *QUIET]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out
    assert [record["epoch"] for record in read_metrics(run_copy / METRICS)] == [1, 2]
    assert load_checkpoint(run_copy)["epoch"] == 2


# --------------------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_cifar_batches_load(tmp_path, protocol):
    batches = write_cifar_dir(tmp_path, protocol=protocol)
    with open(tmp_path / "test_batch", "rb") as stream:
        recorder = RecordingUnpickler(stream, encoding="bytes")
        recorder.load()
    assert recorder.resolved and recorder.resolved <= set(BATCH_GLOBALS)
    dataset = load_cifar10(tmp_path)
    train = torch.from_numpy(np.concatenate([batches[name][b"data"] for name in CIFAR_BATCHES[:5]]))
    train = train.reshape(-1, 3, 32, 32)
    x = dataset.train_x.cpu()
    assert x.dtype == torch.float32
    # the bytes come back exactly from the float32 images, whichever device divided by 255
    assert torch.equal((x * 255).round().to(torch.uint8), train)
    if dataset.train_x.device.type == "cpu":
        # bitwise the CPU's division; CUDA divides by a scalar as a product with 1/255, which rounds
        # some quotients differently (and the bytes above are then the device-independent check)
        assert torch.equal(x, train.float() / 255)
    assert dataset.test_y.tolist() == batches["test_batch"][b"labels"]


def test_protocol_2_batch_imports_only_array_reconstruction(tmp_path):
    """What the format needs, read from a protocol-2 batch's opcodes (as the real files are written)."""
    batch = pickle.dumps(cifar_batch(2, np.random.default_rng(3)), protocol=2)
    assert globals_named(batch) == {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                                    (np.zeros(0).__reduce__()[0].__module__, "_reconstruct")}


def test_numpy_1_names_load(tmp_path):
    """Batches pickled under numpy 1.x name ``numpy.core.multiarray._reconstruct``."""
    batches = write_cifar_dir(tmp_path)
    for name in CIFAR_BATCHES:
        path = tmp_path / name
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
        assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    assert load_cifar10(tmp_path).test_y.tolist() == batches["test_batch"][b"labels"]


def crafted_batch_dir(directory, payload, protocol=2):
    """A CIFAR-10 directory whose ``data_batch_1`` holds ``payload`` as its b"data"."""
    write_cifar_dir(directory)
    batch = {b"batch_label": b"training batch 1 of 5", b"data": payload, b"labels": [3, 1]}
    (directory / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
    return directory / "data_batch_1"


@pytest.mark.parametrize("protocol", [2, 4])
def test_crafted_cifar_batch_is_refused_by_the_api(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = crafted_batch_dir(tmp_path / "cifar", CreatesMarker(marker), protocol)
    with pytest.raises(UnsafeFileError, match=rf"refused to load CIFAR-10 pickle batch '{path}'.* (_?io|builtins)\.open"):
        load_cifar10(tmp_path / "cifar")
    assert not marker.exists()


def test_crafted_cifar_batch_is_refused_by_train(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = crafted_batch_dir(tmp_path / "cifar", CreatesMarker(marker))
    status, lines = run_cli(["train", "--model", "mlp", "--data", f"cifar10:{tmp_path / 'cifar'}",
                             "--out", str(tmp_path / "out"), *QUIET], capsys)
    assert_one_message(status, lines, "refused to load CIFAR-10 pickle batch", str(path), "open")
    assert not marker.exists() and not (tmp_path / "out" / CHECKPOINT).exists()


DAMAGED_BATCHES = {
    "float data": (np.random.default_rng(2).random((2, 3072)), UnsafeFileError, r"numpy\.dtype\('<f8'\)"),
    "object array": (np.array([1, "x"], dtype=object), UnsafeFileError, r"numpy\.dtype\('\|O'\)"),
    "another codec": (Reduces(codecs.encode, "payload", "rot13"), UnsafeFileError, "encoding 'rot13'"),
    "bytes of a size": (Reduces(bytes, 10 ** 6), UnsafeFileError, r"builtins\.bytes with arguments"),
    "wrong width": (np.random.default_rng(2).integers(0, 256, (2, 100), dtype=np.uint8), DataError,
                    r"uint8 \(2, 100\), expected uint8 \(N, 3072\)"),
    "text data": ("not an image", DataError, "must be a numpy array or a list of ints, got str"),
}


@pytest.mark.parametrize("damage", DAMAGED_BATCHES)
def test_batch_outside_the_format_is_refused(tmp_path, damage):
    payload, error, expected = DAMAGED_BATCHES[damage]
    path = crafted_batch_dir(tmp_path, payload)
    with pytest.raises(error, match=expected) as info:
        load_cifar10(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "ragged labels"])
def test_damaged_cifar_batch_is_one_clear_error(tmp_path, damage, capsys):
    write_cifar_dir(tmp_path / "cifar")
    path = tmp_path / "cifar" / "data_batch_1"
    if damage == "ragged labels":
        batch = cifar_batch(2, np.random.default_rng(4))
        batch[b"labels"] = [1, [2, 3]]
        path.write_bytes(pickle.dumps(batch, protocol=2))
    else:
        _bytes_changed({"truncated": _truncated, "random bytes": _random_bytes, "empty": _empty}[damage])(path)
    with pytest.raises(DataError, match=str(path)):
        load_cifar10(tmp_path / "cifar")
    status, lines = run_cli(["train", "--model", "mlp", "--data", f"cifar10:{tmp_path / 'cifar'}",
                             "--out", str(tmp_path / "out"), *QUIET], capsys)
    assert_one_message(status, lines, str(path))
