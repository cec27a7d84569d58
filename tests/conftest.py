"""Shared fixtures live in tests/fixtures/<area>.py, one module per area, loaded here."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

pytest_plugins = [
    "tests.fixtures.space",
    "tests.fixtures.data",
    "tests.fixtures.train",
    "tests.fixtures.search",
]
