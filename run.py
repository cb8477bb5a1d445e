"""Entry point: ``python run.py [overrides]`` (Hydra). See README.md and conf/config.yaml."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))  # works before `pip install -e .` too

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from fss.cli import run_job

    return run_job(cfg)


if __name__ == "__main__":
    main()
