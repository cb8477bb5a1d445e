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


def restore_from_checkpoint(argv: list[str]) -> list[str]:
    """``mode=test ckpt_path=<file>``: add the settings the checkpoint records (its model,
    backbone, data, fold ...); those on the command line win (docs/checkpoints.md)."""
    if not any(arg.startswith("ckpt_path=") for arg in argv):
        return argv
    from fss.checkpoints import restore_command_line
    from fss.utils.errors import ConfigError

    try:
        argv, restored = restore_command_line(argv)
    except ConfigError as error:  # one line and exit status 2, as fss.cli does
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if restored:
        print(f"fss: taken from the checkpoint: {' '.join(restored)}", file=sys.stderr)
    return argv


if __name__ == "__main__":
    from fss.cli import guarded

    sys.argv[1:] = restore_from_checkpoint(sys.argv[1:])
    guarded(main)
