"""Shared fixtures: compose the real Hydra configs, shrunk for tests; the ``gpu`` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Re-exported for test files that still import them from here; new code imports
# tests.helpers.config.
from tests.helpers.config import OFFICIAL_LISTS, ROOT, compose_config

__all__ = ["OFFICIAL_LISTS", "ROOT", "compose_config"]

pytest_plugins = ["pytester"]  # tests/test_harness.py runs pytest on made-up test files

os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

NEEDS_CUDA = "needs a CUDA device"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with one reason, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NEEDS_CUDA)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(overrides: list[str] | None = None, cache_dir: Path | None = None):
        return compose_config(overrides or [], tmp_path, cache_dir)

    return _compose


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One pretraining cache for the whole session: the tiny trunk is trained once."""
    return tmp_path_factory.mktemp("fss-cache")
