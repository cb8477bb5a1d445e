"""wandb dashboards: sweep group, job name, pivotable config, prediction overlays (offline);
the same overlays as PNG files without wandb."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image

from fss.data.transforms import image_to_tensor
from fss.lightning.callbacks import FOREGROUND_RGB, GAP, OVERLAY_ALPHA, Episode, episode_row
from fss.pipeline import run
from fss.utils.loggers import dashboard_config, wandb_logger
from tests.pipeline.test_pipeline import SHORT

TILE = 160
ROW_WIDTH = 4 * TILE + 3 * GAP  # query | support | ground truth | prediction


@pytest.fixture
def multirun_job():
    """Hydra's state inside a job of a multirun with an ablation switch."""
    hydra = OmegaConf.merge(OmegaConf.structured(HydraConf), {
        "mode": "MULTIRUN", "sweep": {"dir": "/logs/hdmnet_synth/multiruns/2025-01-02_03-04-05"},
        "overrides": {"task": ["model.net.num_stages=2", "fold=1", "debug=fdr"]}})
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra}))
    yield
    HydraConfig.instance().cfg = previous


def test_jobs_of_a_sweep_share_a_group_and_are_named_by_job(multirun_job, tmp_path):
    logger = wandb_logger(name="fold1-1shot-seed0", task_name="hdmnet_synth", save_dir=str(tmp_path))
    assert logger._wandb_init["group"] == "hdmnet_synth-2025-01-02_03-04-05"
    assert logger._wandb_init["name"] == "fold1-1shot-seed0 num_stages=2"
    explicit = wandb_logger(group="table1", name="fold1-1shot-seed0", save_dir=str(tmp_path))
    assert explicit._wandb_init["group"] == "table1"


def test_dashboard_config_is_flat_with_ablation_switches(compose_cfg):
    cfg = compose_cfg(["model=hdmnet", "fold=2", "shot=5", "seed=3"])
    config = OmegaConf.to_container(cfg, resolve=False)
    flat = dashboard_config(config)
    assert {k: flat[k] for k in ("model", "data", "backbone", "fold", "shot", "seed")} == {
        "model": "hdmnet", "data": "synth", "backbone": cfg.backbone.name, "fold": 2, "shot": 5,
        "seed": 3}
    switches = {k: v for k, v in flat.items() if k.startswith("model.net.")}
    assert switches["model.net.num_stages"] == cfg.model.net.num_stages
    assert switches["model.net.use_distill"] == cfg.model.net.use_distill
    assert "model.net._target_" not in switches
    assert all(not isinstance(v, dict | list) for v in flat.values())


def test_offline_wandb_run_logs_config_and_overlays(compose_cfg, shared_cache, tmp_path,
                                                    monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_cfg([*SHORT, "logger=wandb"], cache_dir=shared_cache)
    run(cfg)
    try:
        assert wandb.run is not None and wandb.run.name == "fold0-1shot-seed0"
        assert wandb.run.group in ("", None)  # a single run is not part of a sweep
        config = dict(wandb.run.config)
        assert {k: config[k] for k in ("model", "data", "backbone", "fold", "shot", "seed")} == {
            "model": "hsnet", "data": "synth", "backbone": "resnet18", "fold": 0, "shot": 1,
            "seed": 0}
        assert any(k.startswith("model.net.") for k in config)
        assert config["cfg"]["trainer"]["max_epochs"] == 1  # the full config, nested
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = sorted(runs[0].glob("files/media/images/val/predictions_*.png"))
    assert len(images) == 4  # 1 validation x 4 episodes, one row image each
    assert all(np.asarray(Image.open(p)).shape == (TILE, ROW_WIDTH, 3) for p in images)
    assert not (tmp_path / "predictions").exists()  # wandb took the images


def test_overlays_saved_as_png_without_an_image_logger(compose_cfg, shared_cache, tmp_path):
    cfg = compose_cfg([*SHORT, "logger=csv", "trainer.max_epochs=2"], cache_dir=shared_cache)
    run(cfg)
    pngs = sorted(p.name for p in (tmp_path / "predictions").glob("*.png"))
    assert pngs == ["epoch_000.png", "epoch_001.png"]
    grid = np.asarray(Image.open(tmp_path / "predictions" / "epoch_001.png"))
    assert grid.shape == (4 * TILE + 3 * GAP, ROW_WIDTH, 3)  # 4 episodes, one per row


def test_episode_row_tints_masks_and_marks_ignored_pixels():
    size = 8
    grey = np.full((size, size, 3), 100, dtype=np.uint8)
    query_mask = torch.zeros(size, size, dtype=torch.long)
    query_mask[:, :4] = 1
    query_mask[0, 7] = 255
    prediction = torch.zeros(size, size, dtype=torch.long)
    prediction[:2] = 1
    episode = Episode(query=image_to_tensor(grey), support=image_to_tensor(grey),
                      support_mask=torch.zeros(size, size), query_mask=query_mask,
                      prediction=prediction, class_id=3, episode_index=7)
    row = episode_row(episode, tile_size=size)
    assert row.shape == (size, 4 * size + 3 * GAP, 3)
    tinted = np.round((1 - OVERLAY_ALPHA) * 100 + OVERLAY_ALPHA * np.array(FOREGROUND_RGB))
    query, truth = row[:, :size], row[:, 2 * (size + GAP):2 * (size + GAP) + size]
    predicted = row[:, 3 * (size + GAP):]
    assert (query == 100).all()
    assert np.abs(truth[4, 1].astype(int) - tinted).max() <= 1     # foreground
    assert (truth[4, 6] == 100).all()                                # background
    assert (truth[0, 7] > 150).all()                                 # ignored: whitened
    assert np.abs(predicted[1, 6].astype(int) - tinted).max() <= 1
    assert (predicted[5, 6] == 100).all()
    # Caption IoU: target cols 0-3 (32 px), prediction rows 0-1 (16 px, one of them ignored),
    # both rows 0-1 x cols 0-3 (8 px): 8 / (32 + 15 - 8).
    assert episode.iou == pytest.approx(100 * 8 / 39)
