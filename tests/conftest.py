"""Shared fixtures: compose the real Hydra configs, shrunk for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

OFFICIAL_LISTS = ROOT.parent / "shared" / "data" / "official-lists"


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path | None = None):
    """The real config with outputs (and the pretraining cache) under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.cache_dir={cache_dir or output_dir / 'cache'}",
                f"paths.log_dir={output_dir / 'logs'}",
                *overrides,
            ],
        )


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(overrides: list[str] | None = None, cache_dir: Path | None = None):
        return compose_config(overrides or [], tmp_path, cache_dir)

    return _compose


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One pretraining cache for the whole session: the tiny trunk is trained once."""
    return tmp_path_factory.mktemp("fss-cache")
