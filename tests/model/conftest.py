"""Fixtures shared by the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny tensors: one thread is faster, and on a shared 2-core box far faster (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
