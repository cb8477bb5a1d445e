"""Where the project lies and the real Hydra config composed for tests (outputs under a
temporary folder). Imported by tests/conftest.py and by tests that compose outside a
fixture."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]

# The official split lists beside the repository (never copied into it).
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
