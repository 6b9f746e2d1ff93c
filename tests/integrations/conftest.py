import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread. Two threads on a busy 2-core machine turned a 3 ms step of
    the tiny GPT-2 into 1.7 s (OpenMP workers waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
