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


@pytest.fixture(autouse=True)
def ldm_home(tmp_path, monkeypatch):
    """Keep the download cache and its hash index inside each test's folder, and no download source set."""
    monkeypatch.setenv("LDM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LDM_MODEL_URL", raising=False)
    monkeypatch.delenv("LDM_MODEL_SHA256", raising=False)
    return tmp_path / "home"
