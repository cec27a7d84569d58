"""Shared fixtures live in tests/fixtures/<area>.py, one module per area, loaded here."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny test models: one thread is fastest and never oversubscribes

pytest_plugins = [
    "tests.fixtures.space",
    "tests.fixtures.data",
    "tests.fixtures.train",
    "tests.fixtures.search",
    "tests.fixtures.sample",
    "tests.fixtures.postgres",
]
