"""Test configuration. ``FBCOMPILE_TEST_DEVICE=cuda pytest tests`` runs the suite with that device as
torch's default device, so every model and tensor a test builds without naming a device lives there
(the code under test is device-agnostic; CPU is the default and what CI runs)."""
import os

import pytest
import torch

TEST_DEVICE = os.environ.get("FBCOMPILE_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): measures something only the CPU has (the "
                                       "profiler's CPU memory ledger, synchronous errors); skipped on other devices")
    if TEST_DEVICE != "cpu":
        torch.set_default_device(TEST_DEVICE)
        # float32 tests compare against CPU-precision expectations: no TensorFloat-32 convs or matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cpu":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"cpu only: {marker.args[0] if marker.args else ''}"))


def pytest_report_header(config):
    return f"fbcompile test device: {TEST_DEVICE}"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models (as fast, and immune to oversubscription on a busy
    machine), restored afterwards. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def double(model):
    return model.double()
