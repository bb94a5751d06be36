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
