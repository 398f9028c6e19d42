"""Shared pytest settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny test models gain nothing from intra-op threads, and spinning OpenMP threads stall badly on a busy
    machine (a tiny forward pass can take seconds instead of milliseconds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
