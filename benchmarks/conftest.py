"""Shared benchmark set-up: every module runs with ``OMP_NUM_THREADS`` torch threads (default 2)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    yield
    torch.set_num_threads(before)
