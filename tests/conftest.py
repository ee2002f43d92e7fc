import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the tiny built-in checkpoints are written once per test session, never into the user's cache
os.environ.setdefault("MODES_CACHE", tempfile.mkdtemp(prefix="modes-tests-"))
torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; the gpu-tests step of `benchmarks/gpu.sh checks` runs these")


@pytest.fixture
def one_thread():
    """For tests of small ops: on a 2-core machine that is busy with something else, two threads stall for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
