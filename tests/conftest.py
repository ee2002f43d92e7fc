import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the tiny built-in checkpoints are written once per test session, never into the user's cache
os.environ.setdefault("MODES_CACHE", tempfile.mkdtemp(prefix="modes-tests-"))
torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; the gpu-tests step of `benchmarks/gpu.sh checks` runs these")
