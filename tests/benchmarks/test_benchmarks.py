"""The benchmark scripts run and print their tables (tiny inputs; timings are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--repeats", "1", "--warmup", "0", "--threads", "1"]


def _run(script: str, arguments: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *arguments, *TINY]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "failed" not in done.stderr, done.stderr[-2000:]
    return done


def test_inference_benchmark_smoke(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("bench_inference.py", ["--models", "hsnet", "--backbones", "resnet18",
                                       "--shots", "1", "2", "--sizes", "64", "--reference",
                                       "--json", str(out)])
    assert "| hsnet | resnet18 | 1 | 64² |" in done.stdout
    assert "| hsnet | resnet18 | 2 | 64² |" in done.stdout
    assert "straightforward s / episode" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["shot"] for r in rows] == [1, 2]
    assert all(r["median_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    # Fast and straightforward paths predict the same masks on the benchmark episodes.
    assert all(r["reference_mask_agreement"] == 1.0 for r in rows)


def test_inference_benchmark_hdmnet_smoke(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("bench_inference.py", ["--models", "hdmnet", "--backbones", "resnet_small",
                                       "--shots", "2", "--sizes", "65", "--reference",
                                       "--json", str(out)])
    assert "| hdmnet | resnet_small | 2 | 65² |" in done.stdout
    rows = json.loads(out.read_text())
    assert rows[0]["reference_mask_agreement"] == 1.0


def test_training_benchmark_smoke(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("bench_training.py", ["--models", "hsnet", "--backbones", "resnet18",
                                      "--sizes", "64", "--batch", "2", "--reference",
                                      "--json", str(out)])
    assert "| hsnet | resnet18 | 1 | 64² | 2 |" in done.stdout
    done = _run("bench_training.py", ["--models", "hdmnet", "--backbones", "resnet_small",
                                      "--sizes", "65", "--batch", "2", "--json", str(out)])
    assert "| hdmnet | resnet_small | 1 | 65² | 2 |" in done.stdout
    rows = json.loads(out.read_text())
    assert rows[0]["step_s"] > 0 and rows[0]["episodes_per_s"] > 0


@pytest.mark.skipif(not os.environ.get("FSS_OFFICIAL_HSNET"),
                    reason="set FSS_OFFICIAL_HSNET to a checkout of juhongm999/hsnet")
def test_compare_with_official_hsnet(tmp_path):
    """Side by side with the official code: same predictions, logits within 1e-4."""
    out = tmp_path / "rows.json"
    _run("bench_inference.py", ["--models", "hsnet", "--backbones", "resnet50", "--shots", "1",
                                "--sizes", "128", "--compare", os.environ["FSS_OFFICIAL_HSNET"],
                                "--json", str(out)])
    row = json.loads(out.read_text())[0]
    assert row["official_max_abs_logit_diff"] <= 1e-4
    assert row["official_mask_agreement"] == 1.0


def test_side_by_side_plumbing_with_a_stand_in_checkout(tmp_path):
    """--compare loads an official-layout model, gives ours its weights, times both and
    reports the ratio, |Δlogit| and mask agreement (inference) and the training-step ratio."""
    from tests.helpers.fake_official import make_hsnet_checkout

    checkout = make_hsnet_checkout(tmp_path / "hsnet")
    out = tmp_path / "rows.json"
    done = _run("bench_inference.py", ["--models", "hsnet", "--backbones", "resnet50",
                                       "--shots", "1", "--sizes", "64", "--compare",
                                       str(checkout), "--json", str(out)])
    assert "ours / official" in done.stdout and "get_cpu_capability()" in done.stdout
    row = json.loads(out.read_text())[0]
    assert row["official_median_s"] > 0
    assert row["official_max_abs_logit_diff"] <= 1e-5
    assert row["official_mask_agreement"] == 1.0
    done = _run("bench_training.py", ["--models", "hsnet", "--backbones", "resnet50",
                                      "--sizes", "64", "--batch", "2", "--compare",
                                      str(checkout), "--json", str(out)])
    assert "official s / step" in done.stdout
    row = json.loads(out.read_text())[0]
    assert row["official_step_s"] > 0 and row["step_s"] > 0


def test_trunk_benchmark_smoke(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("bench_trunk.py", ["--sizes", "64", "48", "--batch", "2", "--head-channels", "8",
                                   "--json", str(out)])
    assert "| 64² |" in done.stdout and "| 48² |" in done.stdout
    assert "get_cpu_capability()" in done.stdout
    rows = json.loads(out.read_text())
    assert [r["size"] for r in rows] == [64, 48]
    assert rows[0]["relative"] == 1.0 and all(r["step_s"] > 0 for r in rows)
