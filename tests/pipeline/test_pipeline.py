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

ROOT = Path(__file__).resolve().parents[2]
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
    # The CPU matrix products' paths are recorded (HSNet's correlation and 4D convs); the
    # other two models run none, and no earlier job's record leaks into theirs.
    if model == "hsnet":
        paths = written["product_paths"]
        assert {"correlation_coarse", "support_matrix"} <= set(paths)
        assert set(paths.values()) <= {"conv", "mm", "conv+mm"}
    else:
        assert "product_paths" not in written


def test_pretrained_trunk_is_cached_and_reused(compose_cfg, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = compose_cfg(["debug=fdr", *TINY], cache_dir=cache)
    first = run(cfg)
    trunks = list(cache.glob("pretrain/*/backbone.pth"))
    assert len(trunks) == 1
    stamp = trunks[0].stat().st_mtime_ns
    meta = json.loads((trunks[0].parent / "meta.json").read_text())
    assert meta["fold"] == 0 and len(meta["base_classes"]) == 15
    caplog.set_level("INFO")
    second = run(cfg)
    assert trunks[0].stat().st_mtime_ns == stamp
    assert "Reusing base-class pretrained backbone" in caplog.text
    # Training the trunk in the same process must not change the model that follows: the
    # run that trained it and the run that found it cached give the same result.
    assert (second["mIoU"], second["FB-IoU"]) == (first["mIoU"], first["FB-IoU"])
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

    # Resuming for more epochs than the checkpoint's run (a changed setting, allowed
    # explicitly) continues the step counter instead of starting over.
    resumed_dir = tmp_path / "resumed"
    from tests.helpers.config import compose_config

    cfg = compose_config([*SHORT, "trainer.max_epochs=2", f"ckpt_path={last}",
                          "resume.allow_changes=true"], resumed_dir, shared_cache)
    run(cfg)
    state = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * steps_one_epoch
    assert state["epoch"] == 1


def test_last_checkpoint_is_the_latest_epoch_not_the_best(compose_cfg, shared_cache, tmp_path):
    """lr=0 keeps val mIoU flat, so the best checkpoint stays at epoch 0; last.ckpt must
    still follow training (Lightning's save_last=true alone would leave it at epoch 0)."""
    run(compose_cfg([*SHORT, "trainer.max_epochs=3", "model.optimizer.lr=0.0",
                     "model.scheduler=null"], cache_dir=shared_cache))
    directory = tmp_path / "checkpoints"
    last = torch.load(directory / "last.ckpt", map_location="cpu", weights_only=False)
    (best_path,) = [p for p in directory.glob("*.ckpt") if p.name != "last.ckpt"]
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    assert (best["epoch"], last["epoch"]) == (0, 2)
    assert last["global_step"] == 3 * best["global_step"] == 6


def test_joblib_launcher_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_multirun_over_two_folds_in_parallel_then_report(tmp_path):
    """Two folds as two joblib worker processes; fss-report aggregates their metrics.json.
    The training-free prototype model scores above 0 even at fast_dev_run."""
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "WANDB_MODE": "offline"}
    paper = "paper={source:'test table',metric:mIoU,targets:{1:{0:50.0,1:60.0,mean:55.0}}}"
    command = [
        sys.executable, str(ROOT / "run.py"), "-m", "fold=0,1", "model=proto", "model.calibration.episodes=8", "debug=fdr",
        *TINY, paper,
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert [p.name for p in jobs] == ["0_proto_synth_fold0_shot1", "1_proto_synth_fold1_shot1"]
    metrics = [read_metrics(p) for p in jobs]
    assert [m["fold"] for m in metrics] == [0, 1]
    assert all(m["paper"]["targets"]["1"]["mean"] == 55.0 for m in metrics)
    assert all(m["overrides"][0] == f"fold={m['fold']}" for m in metrics)

    from fss.report import write_report

    report = write_report(tmp_path / "sweep")
    (row,) = report.rows
    assert (row.model, row.data, row.shot, row.variant) == ("proto", "synth", 1, "")
    mious, fbious = [m["mIoU"] for m in metrics], [m["FB-IoU"] for m in metrics]
    assert min(mious) > 0
    lines = report.csv.read_text().splitlines()
    mean = (mious[0] + mious[1]) / 2
    assert lines[1] == ",".join([
        "proto", "synth", "resnet18", "1", "", f"{mious[0]:.2f}", f"{mious[1]:.2f}", "", "",
        "2/2", f"{mean:.2f}", f"{(fbious[0] + fbious[1]) / 2:.2f}", "55.00",
        f"{mean - 55.0:+.2f}", "", "", "", "", ""])  # one seed, synthetic: no protocol
    assert "2 job directories (2 ok); the sweep launches 2 jobs, 0 never started" \
        in report.markdown.read_text()


def test_bad_config_exits_with_one_line(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    command = [sys.executable, str(ROOT / "run.py"), "fold=7", f"paths.log_dir={tmp_path}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: fold=7 is out of range; accepted: 0, 1, 2, 3"


def test_bad_job_in_a_sweep_does_not_stop_the_others(tmp_path):
    """fold=7 fails validation; the sweep still runs fold 0 and ends non-zero."""
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "fold=7,0", "model=all_foreground",
               "debug=fdr", *TINY, f"paths.log_dir={tmp_path / 'logs'}",
               f"paths.cache_dir={tmp_path / 'cache'}", "hydra.sweep.dir=" + str(tmp_path / "sweep")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "error: fold=7 is out of range; accepted: 0, 1, 2, 3" in done.stderr
    failed = read_metrics(tmp_path / "sweep" / "0_all_foreground_synth_fold7_shot1")
    finished = read_metrics(tmp_path / "sweep" / "1_all_foreground_synth_fold0_shot1")
    assert (failed["status"], finished["status"]) == ("failed", "ok")


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


def test_every_stage_shows_the_configured_progress_bar(compose_cfg, tmp_path, monkeypatch):
    """The trunk stage trains with a trainer of its own; it shows the run's progress bar
    (callbacks.progress_bar), not Lightning's default rich one."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    bars = []
    original = L.Trainer.fit

    def recording_fit(self, *args, **kwargs):
        bars.append(type(self.progress_bar_callback))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    run(compose_cfg([*SHORT, "callbacks.progress_bar.refresh_rate=5"], cache_dir=tmp_path / "c"))
    assert bars == [TQDMProgressBar, TQDMProgressBar]  # trunk stage, then HSNet


def test_fss_run_is_the_hydra_app_from_any_directory(tmp_path):
    """The console script's function runs a cheap job from a folder without run.py or conf/."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fss-run"] == "fss.cli:main"
    env = {key: value for key, value in os.environ.items() if key != "PROJECT_ROOT"}
    env["PYTHONPATH"] = str(ROOT / "src")
    command = [sys.executable, "-c", "from fss.cli import main; main()"]
    shown = subprocess.run([*command, "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "recipe: " in shown.stdout, shown.stderr[-2000:]
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*command, "model=all_foreground", "mode=test", "recipe=auto", *TINY,
         "data.module.test_episodes=4", f"hydra.run.dir={run_dir}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_metrics(run_dir)["episodes"] == 4
    assert "recipe: none (auto)" in (run_dir / "run.log").read_text()
