"""Entry point: ``python run.py [overrides]`` (Hydra), the same app as ``fss-run``
(:func:`fss.cli.main`). See README.md and conf/config.yaml."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # before `pip install -e .` too

if __name__ == "__main__":
    from fss.cli import main

    main()
