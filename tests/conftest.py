import pytest
import torch


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
