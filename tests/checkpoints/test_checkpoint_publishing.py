"""Self-describing checkpoints: a trained run's checkpoint is tested (`run.py mode=test
ckpt_path=...`) and used (`fss.load_model`) without repeating its configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fss
from fss.checkpoints import CHECKPOINT_KEY, restore_command_line
from fss.pipeline import run
from fss.utils.errors import ConfigError
from tests.helpers.config import compose_config

ROOT = Path(__file__).resolve().parents[2]
# A tiny but real training run with settings that differ from the defaults (fold 1, 64 px,
# the no-support-masking ablation, 4 test episodes): each must come back from the checkpoint.
TINY_RUN = [
    "data.image_size=64", "data.module.num_workers=0", "data.semantic.num_workers=0",
    "trainer.max_epochs=1", "data.module.train_episodes=4", "data.module.batch_size=2",
    "data.module.val_episodes=2", "data.module.test_episodes=4", "data.module.test_batch_size=2",
    "data.semantic.num_train_images=4", "data.semantic.num_val_images=2",
    "data.semantic.batch_size=2", "pretrain.max_epochs=1", "base_learner.max_epochs=1",
    "logger=none", "callbacks.progress_bar.refresh_rate=0",
]
HSNET_RUN = [*TINY_RUN, "fold=1", "model.net.use_support_mask=false"]


def episode(size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, size, size, generator=generator)
    supports = torch.randn(1, 1, 3, size, size, generator=generator)
    masks = torch.zeros(1, 1, size, size)
    masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return query, supports, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    """(run directory, metrics) of the tiny HSNet training run."""
    directory = tmp_path_factory.mktemp("trained")
    metrics = run(compose_config(HSNET_RUN, directory, shared_cache))
    return directory, metrics


def test_every_checkpoint_describes_its_run(trained):
    directory, metrics = trained
    paths = sorted((directory / "checkpoints").glob("*.ckpt"))
    best = [p for p in paths if p.name != "last.ckpt"]
    assert len(paths) == 2 and len(best) == 1  # the best and the last
    for path in paths:
        # Plain values only: the safe loader reads it.
        info = torch.load(path, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
        assert info["fss_version"] == fss.__version__ and info["format"] == 1
        assert (info["model"]["name"], info["backbone"], info["data"]["name"]) == \
            ("hsnet", "resnet18", "synth")
        assert info["model"]["net"]["_target_"] == "fss.models.HSNet"
        assert info["model"]["net"]["use_support_mask"] is False
        assert info["model"]["net"]["weights"] is None
        assert (info["fold"], info["shot"], info["train_shot"]) == (1, 1, 1)
        assert info["data"]["image_size"] == info["input"]["image_size"] == 64
        assert info["evaluation"]["test_episodes"] == 4
        assert info["classes"]["novel"] == [5, 6, 7, 8, 9]
    assert metrics["checkpoint"] == str(best[0])


def test_test_mode_restores_the_run_from_the_checkpoint(trained, shared_cache, tmp_path):
    directory, trained_metrics = trained
    last = directory / "checkpoints" / "last.ckpt"
    argv, restored = restore_command_line(["mode=test", f"ckpt_path={last}"])
    for expected in ("model=hsnet", "backbone=resnet18", "data=synth", "fold=1",
                     "++data.image_size=64", "++model.net.use_support_mask=false",
                     "++data.module.test_episodes=4"):
        assert expected in restored
    assert argv[:2] == ["mode=test", f"ckpt_path={last}"]
    cfg = compose_config(argv, tmp_path, shared_cache)
    assert (cfg.fold, cfg.data.image_size, cfg.model.net.use_support_mask) == (1, 64, False)
    metrics = run(cfg)
    for key in ("model", "data", "backbone", "fold", "episodes", "mIoU", "FB-IoU", "class_iou"):
        assert metrics[key] == trained_metrics[key], key
    assert metrics["episodes"] == 4 and set(metrics["class_iou"]) <= {"5", "6", "7", "8", "9"}


def test_command_line_values_win_over_the_checkpoint(trained, shared_cache, tmp_path):
    last = trained[0] / "checkpoints" / "last.ckpt"
    _, restored = restore_command_line(["mode=test", f"ckpt_path={last}", "fold=2",
                                        "data.image_size=128", "++model.net.use_support_mask=true"])
    keys = [item.split("=")[0].lstrip("+") for item in restored]
    assert "fold" not in keys and "data.image_size" not in keys
    assert "model.net.use_support_mask" not in keys and "model" in keys
    # A group override keeps the checkpoint's settings of that group out.
    _, restored = restore_command_line(["mode=test", f"ckpt_path={last}", "data=pascal"])
    assert not [item for item in restored if item.startswith(("data=", "++data."))]
    # Only mode=test is restored; training resumes with the configuration given.
    assert restore_command_line([f"ckpt_path={last}"]) == ([f"ckpt_path={last}"], [])
    # Another network cannot take these weights: refused before anything is built.
    argv, _ = restore_command_line(["mode=test", f"ckpt_path={last}", "backbone=resnet50"])
    with pytest.raises(ConfigError, match=r"another network: backbone=resnet50 \(checkpoint: resnet18\)"):
        run(compose_config(argv, tmp_path, shared_cache))


# A fresh interpreter (≈ 20 s here); the same restoration runs in-process above.
@pytest.mark.slow
def test_cli_tests_a_checkpoint_with_no_other_override(trained, tmp_path):
    directory, trained_metrics = trained
    last = directory / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Only where to write: the settings of the run all come from the checkpoint.
    command = [sys.executable, str(ROOT / "run.py"), "mode=test", f"ckpt_path={last}",
               f"hydra.run.dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fss: taken from the checkpoint: model=hsnet backbone=resnet18 data=synth fold=1" \
        in done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["model"], metrics["fold"], metrics["episodes"]) == ("hsnet", 1, 4)
    assert (metrics["mIoU"], metrics["FB-IoU"]) == (trained_metrics["mIoU"], trained_metrics["FB-IoU"])


def test_load_checkpoint_returns_a_ready_model(trained):
    last = trained[0] / "checkpoints" / "last.ckpt"
    model = fss.load_model(last)
    assert type(model).__name__ == "HSNet" and not model.training
    assert model.use_support_mask is False and model.backbone.name == "resnet18"
    assert model.checkpoint_info["fold"] == 1
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    assert all(torch.equal(state[k[len("model."):]], v) for k, v in saved.items())
    inputs = episode(64)
    mask = model.predict(*inputs)
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0, 1}
    # The restored ablation flag matters: the same weights with support masking differ.
    with torch.no_grad():
        logits = model(*inputs)
        model.use_support_mask = True
        assert not torch.allclose(model(*inputs), logits)


def test_checkpoint_without_description_still_tests_with_its_config(trained, shared_cache, tmp_path):
    directory, trained_metrics = trained
    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(directory / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, old)
    with pytest.raises(ConfigError, match="without an fss run description"):
        fss.load_model(old)
    assert restore_command_line(["mode=test", f"ckpt_path={old}"])[1] == []
    metrics = run(compose_config([*HSNET_RUN, "mode=test", f"ckpt_path={old}"],
                                 tmp_path / "test", shared_cache))
    assert (metrics["mIoU"], metrics["FB-IoU"]) == (trained_metrics["mIoU"], trained_metrics["FB-IoU"])


def test_hdmnet_checkpoint_is_self_describing(shared_cache, tmp_path):
    cache = shared_cache  # the base learner is trained on the fly (synthetic data)
    overrides = [*TINY_RUN, "data.image_size=65", "model=hdmnet", "backbone=resnet_small",
                 "model.net.num_stages=2"]
    trained_metrics = run(compose_config(overrides, tmp_path / "train", cache))
    last = tmp_path / "train" / "checkpoints" / "last.ckpt"
    model = fss.load_model(last)
    assert type(model).__name__ == "HDMNet" and not model.training
    assert model.transformer.num_stages == 2 and model.pspnet.backbone_name == "resnet_small"
    assert model.predict(*episode(65)).shape == (1, 65, 65)
    argv, restored = restore_command_line(["mode=test", f"ckpt_path={last}"])
    assert "++model.net.num_stages=2" in restored and "backbone=resnet_small" in restored
    metrics = run(compose_config(argv, tmp_path / "test", cache))
    assert (metrics["model"], metrics["backbone"]) == ("hdmnet", "resnet_small")
    assert (metrics["mIoU"], metrics["FB-IoU"]) == (trained_metrics["mIoU"], trained_metrics["FB-IoU"])
