"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests (tiny models gain nothing from 2 threads, and on a
    loaded machine 2 spinning OpenMP threads make them several times slower); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Measurements the package caches (``--precision auto``) go to a temporary folder, not the
    user's ~/.cache; subprocesses inherit it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MMFORMER_CACHE", str(tmp_path_factory.mktemp("mmformer-cache")))
    yield
    mp.undo()
