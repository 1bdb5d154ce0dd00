"""Shared test setup: GPU tests (`@pytest.mark.gpu`) skip with a reason on machines without CUDA."""

import pytest
import torch

import dit_sparse  # noqa: F401  (first: it keeps the checkout's kernels/ from shadowing Hugging Face's `kernels`)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Toy sizes: one CPU thread is as fast as two, and far faster when the cores are busy (no spinning threads).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
