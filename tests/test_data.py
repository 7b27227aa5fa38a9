"""Tests for fbcompile.data: built-in, generated and file-backed datasets, and batches().

Nothing here downloads: IDX and CIFAR files are written by the tests themselves.
"""
import gzip
import math
import pickle
import re
import struct

import numpy as np
import pytest
import torch

from fbcompile.data import DATASET_NAMES, Dataset, batches, load_dataset
from fbcompile.data import cache as data_cache
from fbcompile.data import mnist1d_data
from fbcompile.errors import DataError, FBCompileError


def assert_split(ds, n_train, n_test, input_shape, x_dtype=torch.float32, y_dtype=torch.int64):
    assert isinstance(ds, Dataset)
    assert ds.train_x.shape == (n_train, *input_shape) and ds.test_x.shape == (n_test, *input_shape)
    assert len(ds.train_y) == n_train and len(ds.test_y) == n_test
    assert ds.input_shape == input_shape
    assert ds.train_x.dtype == ds.test_x.dtype == x_dtype
    assert ds.train_y.dtype == ds.test_y.dtype == y_dtype


# ---------------------------------------------------------------------------------------- digits

def test_digits_shapes_range_and_fixed_split():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=123)
    assert_split(a, 1347, 450, (1, 8, 8))
    assert a.task == "classification" and a.num_classes == 10
    assert a.train_x.min() >= 0 and a.train_x.max() <= 1 and a.train_x.max() == 1
    assert set(a.train_y.tolist()) == set(range(10)) == set(a.test_y.tolist())
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert "digits" in a.describe() and "1347" in a.describe() and "10 classes" in a.describe()


# --------------------------------------------------------------------------------------- mnist1d

def test_mnist1d_generated_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FBCOMPILE_CACHE", str(tmp_path))
    mnist1d_data._mnist1d_arrays.cache_clear()
    ds = load_dataset("mnist1d")
    assert_split(ds, 4000, 1000, (1, 40))
    assert ds.num_classes == 10 and set(ds.test_y.tolist()) == set(range(10))
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1
    mnist1d_data._mnist1d_arrays.cache_clear()  # the next load reads the disk cache
    again = load_dataset("mnist1d", seed=5)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)


def test_mnist1d_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mnist1d.data", None)
    mnist1d_data._mnist1d_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install mnist1d"):
            load_dataset("mnist1d")
    finally:
        mnist1d_data._mnist1d_arrays.cache_clear()


def test_cache_regenerates_a_corrupt_file(tmp_path):
    path = tmp_path / "sub" / "arrays.npz"
    calls = []

    def make():
        calls.append(1)
        return {"a": np.arange(3)}

    assert data_cache.cached_arrays(path, ("a",), make)["a"].tolist() == [0, 1, 2]
    assert data_cache.cached_arrays(path, ("a",), make)["a"].tolist() == [0, 1, 2]
    assert len(calls) == 1
    path.write_bytes(b"not a zip file")
    assert data_cache.cached_arrays(path, ("a",), make)["a"].tolist() == [0, 1, 2]
    assert len(calls) == 2
    assert data_cache.cached_arrays(path, ("a", "missing"), make)["a"].tolist() == [0, 1, 2]
    assert len(calls) == 3
    assert [p.name for p in path.parent.iterdir()] == ["arrays.npz"]  # no temp files left


# ------------------------------------------------------------------------------------------- IDX

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx_dir(directory, gz, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    data = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
            "test": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
    for split, (images_name, labels_name) in IDX_NAMES.items():
        for name, array in zip((images_name, labels_name), data[split]):
            raw = idx_bytes(array)
            if gz:
                (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)
    return data


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, name, gz):
    data = write_idx_dir(tmp_path, gz)
    ds = load_dataset(f"{name}:{tmp_path}")
    assert ds.name == name
    assert_split(ds, 5, 3, (1, 28, 28))
    for split in ("train", "test"):
        images, labels = data[split]
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        assert torch.equal(x, torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255)
        assert torch.equal(y, torch.tensor(labels, dtype=torch.int64))


def test_idx_truncated_file_names_it(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_truncated_gzip_names_it(tmp_path):
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_wrong_magic_names_it(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float32 dtype code instead of unsigned byte
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*magic"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_idx_count_mismatch_and_missing_files(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4)))
    with pytest.raises(DataError, match="5 images.*train-labels-idx1-ubyte.*4 labels"):
        load_dataset(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="missing IDX.*t10k-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


# ----------------------------------------------------------------------------------------- CIFAR

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_dir(directory, n=4, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in CIFAR_BATCHES:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_cifar_round_trip(tmp_path, nested):
    written = write_cifar_dir(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert_split(ds, 20, 4, (3, 32, 32))
    train = np.concatenate([written[b][0] for b in CIFAR_BATCHES[:5]])
    expected = torch.tensor(train, dtype=torch.float32).reshape(20, 3, 32, 32) / 255
    assert torch.equal(ds.train_x, expected)
    assert ds.train_y.tolist() == sum((written[b][1] for b in CIFAR_BATCHES[:5]), [])
    assert ds.test_y.tolist() == written["test_batch"][1]
    # channel-major layout: the first 1024 values of a row are the red plane
    assert torch.equal(ds.test_x[0, 0].flatten(), torch.tensor(written["test_batch"][0][0, :1024]) / 255.0)


def test_cifar_missing_and_malformed_batches(tmp_path):
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing batch.*data_batch_3") as info:
        load_dataset(f"cifar10:{tmp_path}")
    assert f"{tmp_path}: data_batch_3 (expected" in str(info.value)  # only the missing one listed
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="data_batch_3.*3072"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(f"cifar10:{tmp_path}")


# ------------------------------------------------------------------------------------- synthetic

def test_synthetic_regression_matches_paper_formula():
    ds = load_dataset("synthetic-regression", seed=3)
    assert_split(ds, 5000, 1000, (256,), y_dtype=torch.float32)
    assert ds.task == "regression" and ds.num_classes == 10
    assert ds.train_y.shape == (5000, 10) and ds.test_y.shape == (1000, 10)
    phi = torch.tensor([-math.pi / 2 + j * math.pi / 9 for j in range(10)], dtype=torch.float64)
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        expected = torch.cos(x.double().mean(dim=1, keepdim=True) + phi).float()
        assert torch.equal(y, expected)
    # per-example means spread over [-pi, pi] (entries N(mu, 1), mu ~ U(-pi, pi))
    means = ds.train_x.double().mean(dim=1)
    assert means.min() < -2.5 and means.max() > 2.5 and means.abs().max() < math.pi + 0.5
    assert abs(float((ds.train_x.double() - means[:, None]).std()) - 1.0) < 0.01


@pytest.mark.parametrize("name", ["synthetic-regression", "synthetic-classification"])
def test_synthetic_sets_are_deterministic_per_seed(name):
    a, b, c = load_dataset(name, seed=1), load_dataset(name, seed=1), load_dataset(name, seed=2)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_classification_shapes():
    ds = load_dataset("synthetic-classification", seed=0)
    assert_split(ds, 25000, 5000, (256,))
    assert ds.num_classes == 10 and set(ds.train_y.tolist()) == set(range(10))
    assert "25000 train / 5000 test" in ds.describe()


# --------------------------------------------------------------------------------------- batches

def test_batches_cover_each_sample_once_and_keep_last_partial():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    y = torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    got = list(batches(x, y, 4, shuffle=True, generator=gen))
    assert [len(xb) for xb, _ in got] == [4, 4, 2]
    seen = torch.cat([yb for _, yb in got])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in got)  # pairs stay together
    plain = list(batches(x, y, 4, shuffle=False))
    assert torch.cat([yb for _, yb in plain]).tolist() == list(range(10))


def test_batches_deterministic_with_seeded_generator():
    x, y = torch.randn(17, 3), torch.arange(17)

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([yb for _, yb in batches(x, y, 5, shuffle=True, generator=gen)]).tolist()

    assert order(7) == order(7)
    assert order(7) != order(8)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_batches_reject_bad_arguments_eagerly(bad):
    with pytest.raises(DataError, match="batch_size"):
        batches(torch.zeros(3), torch.zeros(3), bad, shuffle=False)
    with pytest.raises(DataError, match="3 samples but y has 2"):
        batches(torch.zeros(3), torch.zeros(2), 2, shuffle=False)


# ------------------------------------------------------------------------------------- bad specs

@pytest.mark.parametrize("spec, fragment", [
    ("imagenet", "unknown dataset 'imagenet'"),
    ("", "non-empty"),
    ("mnist", "needs a directory"),
    ("cifar10:", "needs a directory"),
    ("digits:/tmp", "takes no directory"),
])
def test_bad_specs_list_the_choices(spec, fragment):
    with pytest.raises(DataError, match=fragment) as info:
        load_dataset(spec)
    assert isinstance(info.value, FBCompileError)
    for name in ("digits", "mnist1d", "cifar10:DIR", "synthetic-classification"):
        assert name in str(info.value)


def test_missing_directory_and_bad_seed(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(f"mnist:{missing}") + ".*does not exist.*digits"):
        load_dataset(f"mnist:{missing}")
    with pytest.raises(DataError, match="seed"):
        load_dataset("synthetic-regression", seed=-1)


def test_dataset_names():
    assert DATASET_NAMES == ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10",
                             "synthetic-regression", "synthetic-classification")
