"""Runs several ``run.py`` command lines in this one interpreter (imports paid once) and
prints, as JSON, each one's exit status and what it wrote to stderr.

    python tests/helpers/cli_batch.py '[["fold=7", "hydra.run.dir=/tmp/a"], ["seed=-1", ...]]'
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_one(arguments: list[str]) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    import fss.cli

    GlobalHydra.instance().clear()
    fss.cli._TASK_STARTED = False
    sys.argv = [str(ROOT / "run.py"), *arguments]
    stderr = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as error:  # noqa: BLE001 - reported, not raised
            code = 1
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
    return {"code": code, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    results = [run_one(arguments) for arguments in json.loads(sys.argv[1])]
    print(json.dumps(results))
