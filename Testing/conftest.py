"""Shared fixtures for the SegHiResCAM test suite (plain pytest, no Slicer application)."""

import os

import pytest
import torch

# keep runs reproducible and within CI's 2 cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
