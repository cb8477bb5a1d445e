"""Scripts run in a new Python process with or without the three AVX2 caps, which PyTorch,
oneDNN and MKL read only at start-up (docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
# Together they emulate an AVX2 machine on an AVX-512 one (and change nothing on AVX2).
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_json_script(script: str, caps: bool, timeout: float = 300, **env: str) -> dict:
    """Run ``script`` with fss's ``src/`` on the path, the caps set (``caps``) or removed,
    and ``env`` added; return the JSON object its last line prints."""
    environment = {key: value for key, value in os.environ.items() if key not in AVX2_CAPS}
    environment.update(PYTHONPATH=str(SRC), **env)
    if caps:
        environment.update(AVX2_CAPS)
    done = subprocess.run([sys.executable, "-c", script], env=environment,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
