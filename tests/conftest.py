"""Test tiers: the default run executes every CPU tier; ``gpu`` tests skip without CUDA and
``shared_data`` tests skip when ``../shared/data`` (the developers' data folder) is absent."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_data = pytest.mark.skip(reason=f"needs {SHARED_DATA}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(no_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test on one intra-op thread, also after a test (or a library) changed it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_configure(config):
    # Tiny-model matmuls thrash with two threads on a shared 2-core machine (measured 140x slower);
    # one thread is also the honest setting for CI's 2 cores running pytest alone.
    torch.set_num_threads(1)
