"""Test-wide setup: GPU-only tests skip without a GPU; a fixed seed per test. (Without a GPU,
Triton runs in its interpreter: the repository's root conftest.py sets TRITON_INTERPRET=1
before anything imports Triton.)"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip (never fail) GPU-only tests where there is no GPU, saying why."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    """Backend resolution is cached per process (fastcnn.ops.dispatch); tests that fake a GPU
    or an unavailable backend must not see another test's answers, nor leave theirs behind."""
    from fastcnn.ops import dispatch

    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the test machines are shared, and oversubscribed threads made training tests 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
