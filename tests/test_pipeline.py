"""The run end to end on tiny synthetic settings: fit, test, resume, test-only, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fss.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=64", "data.module.num_workers=0", "data.semantic.num_workers=0"]
SHORT = [
    *TINY, "trainer.max_epochs=1", "data.module.train_episodes=8", "data.module.batch_size=4",
    "data.module.val_episodes=4", "data.module.test_episodes=6", "data.module.test_batch_size=3",
    "data.semantic.num_train_images=8", "data.semantic.num_val_images=4",
    "data.semantic.batch_size=4", "pretrain.max_epochs=1", "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
]


def read_metrics(directory: Path) -> dict:
    return json.loads((directory / "metrics.json").read_text())


@pytest.mark.parametrize("model", ["hsnet", "proto", "all_foreground"])
def test_fast_dev_run_writes_metrics(compose_cfg, shared_cache, tmp_path, model):
    cfg = compose_cfg([f"model={model}", "debug=fdr", *TINY], cache_dir=shared_cache)
    metrics = run(cfg)
    written = read_metrics(tmp_path)
    assert written == metrics
    for key in ("model", "data", "backbone", "fold", "shot", "seed", "episodes", "mIoU", "FB-IoU"):
        assert key in written
    assert written["model"] == model and written["data"] == "synth" and written["status"] == "ok"
    assert written["episodes"] == 2  # fast_dev_run: one test batch of 2 episodes
    assert 0.0 <= written["FB-IoU"] <= 100.0
    if model == "all_foreground":
        # Everything predicted foreground: background IoU is 0, so FB-IoU = pooled fg IoU / 2.
        assert 0.0 < written["FB-IoU"] <= 50.0 and written["mIoU"] > 0.0


def test_pretrained_trunk_is_cached_and_reused(compose_cfg, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = compose_cfg(["debug=fdr", *TINY], cache_dir=cache)
    run(cfg)
    trunks = list(cache.glob("pretrain/*/backbone.pth"))
    assert len(trunks) == 1
    stamp = trunks[0].stat().st_mtime_ns
    meta = json.loads((trunks[0].parent / "meta.json").read_text())
    assert meta["fold"] == 0 and len(meta["base_classes"]) == 15
    caplog.set_level("INFO")
    run(cfg)
    assert trunks[0].stat().st_mtime_ns == stamp
    assert "Reusing base-class pretrained backbone" in caplog.text
    # A different fold is a different trunk: its base classes differ.
    run(compose_cfg(["debug=fdr", "fold=1", *TINY], cache_dir=cache))
    assert len(list(cache.glob("pretrain/*/backbone.pth"))) == 2


def test_resume_from_last_checkpoint_and_test_only_mode(compose_cfg, shared_cache, tmp_path):
    first = run(compose_cfg(SHORT, cache_dir=shared_cache))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    steps_one_epoch = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert steps_one_epoch == 2  # 8 episodes / batch 4

    # Test-only mode on the same checkpoint reproduces the test score exactly.
    again = run(compose_cfg([*SHORT, "mode=test", f"ckpt_path={last}"], cache_dir=shared_cache))
    assert again["mIoU"] == first["mIoU"] and again["episodes"] == first["episodes"] == 6

    # Resuming continues the step counter instead of starting over.
    resumed_dir = tmp_path / "resumed"
    from tests.conftest import compose_config

    cfg = compose_config([*SHORT, "trainer.max_epochs=2", f"ckpt_path={last}"], resumed_dir,
                         shared_cache)
    run(cfg)
    state = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * steps_one_epoch
    assert state["epoch"] == 1


def test_wandb_logger_runs_offline_without_an_account(compose_cfg, shared_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_cfg([*SHORT, "logger=wandb"], cache_dir=shared_cache)
    assert cfg.logger.wandb.group == "hsnet-synth-1shot" and cfg.logger.wandb.name == "fold0"
    run(cfg)
    from fss.cli import _finish_wandb

    _finish_wandb()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs, "no offline wandb run directory was written"


def test_multirun_over_two_folds_writes_one_dir_per_job(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "WANDB_MODE": "offline"}
    command = [
        sys.executable, str(ROOT / "run.py"), "-m", "fold=0,1", "debug=fdr", *TINY,
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert [p.name for p in jobs] == ["0_fold0_shot1", "1_fold1_shot1"]
    assert [read_metrics(p)["fold"] for p in jobs] == [0, 1]


def test_bad_config_exits_with_one_line(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    command = [sys.executable, str(ROOT / "run.py"), "fold=7", f"paths.log_dir={tmp_path}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: fold=7 is out of range; accepted: 0, 1, 2, 3"


def test_verify_fails_loudly_outside_tolerance(compose_cfg, shared_cache, tmp_path):
    from fss.utils.errors import RegressionError

    cfg = compose_cfg(["model=all_foreground", "debug=fdr", *TINY, "verify.mIoU=99.0",
                       "verify.tolerance=1.0"], cache_dir=shared_cache)
    with pytest.raises(RegressionError, match="outside the expected 99.0"):
        run(cfg)
    record = read_metrics(tmp_path)
    assert record["status"] == "regression" and record["verify"]["expected_mIoU"] == 99.0
    cfg.verify.tolerance = 100.0
    assert run(cfg)["status"] == "ok"
