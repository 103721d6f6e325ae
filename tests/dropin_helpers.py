"""Shared by the drop-in surface tests (pipeline, auto, streamers, peft, cli): one intra-op thread while they run.

They check tokens, not speed; on a shared 2-core machine a second OpenMP thread mostly waits for a core (a tiny
model's generate went from under a second to ~20 s under load), so each test runs with one and restores the count.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
