import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """These tests run beside others on small shared machines, where OpenMP threads spinning for a core
    oversubscribed by other processes cost far more (2-3x wall time) than a second thread gains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="package")
def paged_kernel_ready():
    """Model tests run decode attention in the C++ kernel (built once per machine; the background build
    would otherwise leave the first steps, or all of a short test, on the gather path). Without a compiler
    this returns at once and they run the gather path, which test_paged_kernel's fallback test covers."""
    from splitserve.model import paged_kernel

    paged_kernel.load()
