"""A run killed after a checkpoint and resumed from it ends as the uninterrupted run did.

Each run is a ``run.py`` subprocess; the interrupted ones kill themselves with SIGKILL at a
given step (``tests/helpers/resume.py``), after the checkpoint under test was written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# 16 training episodes in batches of 4: 4 steps an epoch, 2 epochs; one loader worker (the
# synthetic default), whose iterator Lightning creates before a resumed epoch starts.
TINY = [
    "data.image_size=64", "data.module.num_workers=1", "data.semantic.num_workers=0",
    "data.module.train_episodes=16", "data.module.batch_size=4", "data.module.val_episodes=4",
    "data.module.test_episodes=6", "data.module.test_batch_size=3",
    "data.semantic.num_train_images=8", "data.semantic.num_val_images=4",
    "data.semantic.batch_size=4", "pretrain.max_epochs=1", "trainer.max_epochs=2",
    "callbacks.progress_bar.refresh_rate=0", "logger=csv",
]
MID_EPOCH = "+callbacks.latest_checkpoint.every_n_train_steps=2"  # mid-epoch and at the end


def launch(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *TINY, f"paths.cache_dir={cache}",
         f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def killed_at(step: int) -> list[str]:
    return ["+callbacks.kill._target_=tests.helpers.resume.KillAtStep", f"+callbacks.kill.step={step}"]


def final_state(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return checkpoint, metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = root / "cache"
    done = launch(root / "full", cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, cache, final_state(root / "full")


def assert_same_run(resumed_dir: Path, reference: tuple[dict, dict]) -> None:
    checkpoint, metrics = final_state(resumed_dir)
    expected_checkpoint, expected_metrics = reference
    assert checkpoint["global_step"] == expected_checkpoint["global_step"] == 8
    weights, expected = checkpoint["state_dict"], expected_checkpoint["state_dict"]
    assert weights.keys() == expected.keys()
    different = [key for key in weights if not torch.equal(weights[key], expected[key])]
    assert different == [], f"{len(different)} of {len(weights)} tensors differ: {different[:5]}"
    for state, reference_state in zip(checkpoint["optimizer_states"][0]["state"].values(),
                                      expected_checkpoint["optimizer_states"][0]["state"].values(),
                                      strict=True):
        assert all(torch.equal(state[k], reference_state[k]) for k in state)
    assert checkpoint["lr_schedulers"] == expected_checkpoint["lr_schedulers"]
    for key in ("mIoU", "FB-IoU", "class_iou", "episodes"):
        assert metrics[key] == expected_metrics[key], key
    # The best checkpoint (by validation mIoU) is the same epoch in both runs.
    assert Path(metrics["checkpoint"]).name == Path(expected_metrics["checkpoint"]).name


def test_resume_after_an_epoch_end_checkpoint_equals_the_uninterrupted_run(uninterrupted):
    root, cache, reference = uninterrupted
    run_dir = root / "epoch_end"
    # Killed in the second epoch; last.ckpt is the one written at the end of the first.
    killed = launch(run_dir, cache, *killed_at(6))
    assert killed.returncode == -9
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert saved["global_step"] == 4
    assert saved["FewShotDataModule"]["training_position"] == {"epoch": 1, "batches": 0}

    # Resumed with an empty cache: the checkpoint holds the trunk, no stage runs again.
    empty_cache = root / "empty-cache"
    resumed = launch(run_dir, empty_cache, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (empty_cache / "pretrain").exists()
    assert "resuming from a checkpoint that ended before the epoch ended" not in resumed.stderr
    assert_same_run(run_dir, reference)


def test_resume_from_a_mid_epoch_checkpoint_continues_at_the_next_episode(uninterrupted):
    root, cache, reference = uninterrupted
    run_dir = root / "mid_epoch"
    killed = launch(run_dir, cache, MID_EPOCH, *killed_at(3))
    assert killed.returncode == -9
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert saved["global_step"] == 2  # two of the first epoch's four batches
    assert saved["FewShotDataModule"]["training_position"] == {"epoch": 0, "batches": 2}
    resumed = launch(run_dir, cache, MID_EPOCH,
                     f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr + resumed.stdout
    assert_same_run(run_dir, reference)


def test_resume_with_other_settings_is_refused_naming_the_keys(uninterrupted, tmp_path):
    root, cache, _ = uninterrupted
    last = root / "full" / "checkpoints" / "last.ckpt"
    refused = launch(tmp_path / "other", cache, f"ckpt_path={last}", "model.optimizer.lr=0.01",
                     "data.module.train_episodes=32", "data.module.num_workers=0")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "model.optimizer.lr: checkpoint 0.001, now 0.01" in lines[0]
    assert "data.module.train_episodes: checkpoint 16, now 32" in lines[0]
    assert "num_workers" not in lines[0]  # loader settings never change a result
    assert "resume.allow_changes=true" in lines[0]
    assert not (tmp_path / "other" / "checkpoints").exists()  # refused before anything ran


@pytest.mark.slow
def test_hdmnet_resumed_after_an_epoch_end_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """HDMNet trains with dropout: the resumed run must draw the same masks (every step
    seeds from (seed, step)); its base learner comes from the checkpoint, not the stage."""
    model = ["model=hdmnet", "data.image_size=65"]
    cache = tmp_path / "cache"
    full = launch(tmp_path / "full", cache, *model)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = tmp_path / "killed"
    assert launch(run_dir, cache, *model, *killed_at(6)).returncode == -9
    resumed = launch(run_dir, tmp_path / "empty-cache", *model,
                     f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "empty-cache" / "base_learner").exists()
    assert_same_run(run_dir, final_state(tmp_path / "full"))
