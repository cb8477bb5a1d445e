"""The benchmark script runs and prints its table (tiny input; timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_inference_benchmark_smoke(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--models", "hsnet",
               "--backbones", "resnet18", "--shots", "1", "2", "--sizes", "64", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| hsnet | resnet18 | 1 | 64² |" in done.stdout
    assert "| hsnet | resnet18 | 2 | 64² |" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["shot"] for r in rows] == [1, 2]
    assert all(r["median_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
