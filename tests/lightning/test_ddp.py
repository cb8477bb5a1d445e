"""DDP on CPU (gloo, 2 processes) against one process: one set of outputs, no sync warnings,
the same training and the same test numbers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TITLE = "hsnet on synth — fold 0, 1-shot, backbone resnet18"
# 8 training episodes in 2 steps of 4: one process takes batches of 4, each of two ranks
# batches of 2 (rank r draws episodes r, r + 2, ...), so every optimizer step sees the same 4.
TINY = [
    "data.image_size=64", "data.module.num_workers=0", "data.semantic.num_workers=0",
    "trainer.max_epochs=1", "data.module.train_episodes=8", "data.module.val_episodes=4",
    "data.module.test_episodes=8", "data.module.test_batch_size=2",
    "data.semantic.num_train_images=8", "data.semantic.num_val_images=4",
    "data.semantic.batch_size=4", "pretrain.max_epochs=1", "logger=csv",
    "callbacks.progress_bar.refresh_rate=0", "trainer.accelerator=cpu",
    "trainer.precision=32-true",
]


def _run(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    command = [sys.executable, str(ROOT / "run.py"), *TINY, *overrides,
               f"paths.log_dir={tmp_path / name}", f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _epoch_loss(run_dir: Path) -> float:
    (table,) = run_dir.glob("csv/*/metrics.csv")
    rows = [r for r in csv.DictReader(table.open()) if r.get("train/loss_epoch")]
    return float(rows[-1]["train/loss_epoch"])


def test_two_cpu_processes_write_once_and_match_one_process(tmp_path):
    # One process first: it trains the tiny trunk into the shared cache, so both runs build
    # HSNet on the same trunk.
    _run(tmp_path, "one", "data.module.batch_size=4", f"hydra.run.dir={tmp_path / 'one_run'}")
    # Two processes with the default, time-stamped run directory: Lightning starts rank 1
    # with rank 0's directory, so the whole tree under paths.log_dir holds one run.
    two = _run(tmp_path, "two", "data.module.batch_size=2", "trainer=ddp", "trainer.devices=2")

    written = list((tmp_path / "two").rglob("metrics.json"))
    assert len(written) == 1, written
    run_dir = written[0].parent
    assert len(list((tmp_path / "two").glob("*/runs/*"))) == 1
    assert two.stdout.count(TITLE) == 1
    assert [line for line in (two.stdout + two.stderr).splitlines() if "sync_dist" in line] == []
    log = (run_dir / "run.log").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log  # it did run 2 ranks
    assert log.count("fss.pipeline][INFO] - Wrote ") == 1  # both ranks log here; one writes

    one_dir = tmp_path / "one_run"
    one, ddp = (json.loads((d / "metrics.json").read_text()) for d in (one_dir, run_dir))
    assert ddp["episodes"] == one["episodes"] == 8
    assert (ddp["mIoU"], ddp["FB-IoU"], ddp["class_iou"]) == \
        (one["mIoU"], one["FB-IoU"], one["class_iou"])
    # episodes.csv: every episode once, gathered from both ranks, in index order.
    from fss.metrics import episodes

    rows = {name: episodes.read(d / "episodes.csv") for name, d in (("one", one_dir),
                                                                    ("ddp", run_dir))}
    identity = {name: [[r[k] for k in episodes.IDENTITY] for r in table]
                for name, table in rows.items()}
    assert identity["ddp"] == identity["one"] and len(identity["ddp"]) == 8
    assert episodes.scores(rows["ddp"])["miou"] == pytest.approx(ddp["mIoU"], abs=0.005)
    # The same optimizer steps: the learned weights and the all-rank epoch loss agree.
    assert _epoch_loss(run_dir) == pytest.approx(_epoch_loss(one_dir), abs=1e-6)
    weights = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)["state_dict"] for d in (one_dir, run_dir)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(weights[1][key], value, rtol=0, atol=1e-5, msg=key)
