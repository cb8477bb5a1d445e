"""HDMNet's base-learner stage (fss.stages.base_learner): train, cache, reuse, refuse mismatches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fss.models.pspnet import PSPNet
from fss.pipeline import run
from fss.stages import check_stages, run_stages
from fss.stages.base_learner import base_learner_key
from fss.utils.errors import ConfigError

# Shared 2-core machine: one intra-op thread avoids OpenMP spin-waits under load.
torch.set_num_threads(1)
# 65 = 8·8 + 1: PSPNet's (H - 1) % 8 == 0 rule with tiny scenes.
TINY = ["data.image_size=65", "data.module.num_workers=0", "data.semantic.num_workers=0",
        "debug=fdr"]


def ensure_base_learner(cfg) -> Path | None:
    """What the pipeline does for model=hdmnet before it builds the network."""
    check_stages(cfg)
    weights = run_stages(cfg)
    return None if weights is None else Path(weights)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fast_dev_run base learner (model=pspnet) shared by the tests of this file."""
    from tests.helpers.config import compose_config

    root = tmp_path_factory.mktemp("base-learner")
    cache = root / "cache"
    cfg = compose_config(["model=pspnet", *TINY], root / "first", cache)
    metrics = run(cfg)
    return cfg, metrics, cache, root


def test_model_pspnet_trains_and_writes_checkpoint_meta_and_metrics(trained):
    cfg, metrics, cache, root = trained
    checkpoints = list(cache.glob("base_learner/*/best.pth"))
    assert len(checkpoints) == 1
    directory = checkpoints[0].parent
    assert directory.name == base_learner_key(cfg)
    assert directory.name.startswith("synth-fold0-resnet_small-")
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["data"], meta["fold"], meta["backbone"], meta["num_classes"]) == (
        "synth", 0, "resnet_small", 16)
    assert meta["fast_dev_run"] is True and len(meta["base_classes"]) == 15
    written = json.loads((root / "first" / "metrics.json").read_text())
    assert written["model"] == "pspnet" and written["reused"] is False
    assert written["checkpoint"] == str(checkpoints[0])
    assert 0.0 <= written["mIoU"] <= 100.0 and written["mIoU"] == meta["val_miou_base"]
    # The file is a PSPNet state dict (official best.pth layout) that HDMNet can load.
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)["state_dict"]
    PSPNet("resnet_small", 16, strict_size=True).load_state_dict(state)


def test_second_run_reuses_the_checkpoint(trained, caplog):
    cfg, _, cache, root = trained
    from tests.helpers.config import compose_config

    checkpoint = next(cache.glob("base_learner/*/best.pth"))
    stamp = checkpoint.stat().st_mtime_ns
    caplog.set_level("INFO")
    again = run(compose_config(["model=pspnet", *TINY], root / "second", cache))
    assert checkpoint.stat().st_mtime_ns == stamp
    assert "Reusing base learner" in caplog.text
    assert again["reused"] is True and again["checkpoint"] == str(checkpoint)
    # HDMNet's stage finds the same file (shared recipe => shared cache key).
    hdmnet = compose_config(["model=hdmnet", *TINY], root / "third", cache)
    assert ensure_base_learner(hdmnet) == checkpoint
    assert checkpoint.stat().st_mtime_ns == stamp


def test_model_pspnet_test_mode_evaluates_the_cached_checkpoint(trained, tmp_path):
    _, _, cache, _ = trained
    from tests.helpers.config import compose_config

    checkpoint = next(cache.glob("base_learner/*/best.pth"))
    stamp = checkpoint.stat().st_mtime_ns
    metrics = run(compose_config(["model=pspnet", "mode=test", *TINY], tmp_path, cache))
    assert metrics["mode"] == "test" and metrics["checkpoint"] == str(checkpoint)
    assert 0.0 <= metrics["mIoU"] <= 100.0 and checkpoint.stat().st_mtime_ns == stamp
    # Nothing cached for fold 1: test mode never trains.
    with pytest.raises(ConfigError, match="no base-learner"):
        run(compose_config(["model=pspnet", "mode=test", "fold=1", *TINY], tmp_path, cache))


def test_checkpoint_of_another_fold_is_refused(trained, tmp_path):
    _, _, cache, _ = trained
    from tests.helpers.config import compose_config

    checkpoint = next(cache.glob("base_learner/*/best.pth"))
    cfg = compose_config(["model=hdmnet", "fold=1", f"base_learner.ckpt={checkpoint}", *TINY],
                         tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError) as error:
        ensure_base_learner(cfg)
    message = str(error.value)
    assert "fold=0 (this run: fold=1)" in message
    assert "python run.py model=pspnet data=synth fold=1 backbone=resnet_small" in message
    assert "\n" not in message


def test_checkpoint_with_another_class_count_is_refused(trained, tmp_path):
    _, _, cache, _ = trained
    from tests.helpers.config import compose_config

    # A COCO-sized classifier (61 outputs), no meta.json: the state dict itself is checked.
    foreign = tmp_path / "coco" / "best.pth"
    foreign.parent.mkdir()
    torch.save({"state_dict": PSPNet("resnet_small", 61).state_dict()}, foreign)
    cfg = compose_config(["model=hdmnet", f"base_learner.ckpt={foreign}", *TINY], tmp_path,
                         tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"num_classes=61 \(this run: num_classes=16\)"):
        ensure_base_learner(cfg)
    # And with a meta.json that says so.
    copy = tmp_path / "other" / "best.pth"
    copy.parent.mkdir()
    shutil.copy(next(cache.glob("base_learner/*/best.pth")), copy)
    meta = json.loads(next(cache.glob("base_learner/*/meta.json")).read_text())
    (copy.parent / "meta.json").write_text(json.dumps({**meta, "data": "pascal"}))
    cfg = compose_config(["model=hdmnet", f"base_learner.ckpt={copy}", *TINY], tmp_path,
                         tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data=pascal \(this run: data=synth\)"):
        ensure_base_learner(cfg)


def test_num_classes_base_must_match_the_data(compose_cfg):
    cfg = compose_cfg(["model=hdmnet", "model.net.num_classes_base=60", *TINY])
    with pytest.raises(ConfigError, match="model.net.num_classes_base=15"):
        ensure_base_learner(cfg)


def test_real_data_without_checkpoint_names_the_command(compose_cfg, tmp_path):
    """A real dataset never trains PSPNet as a side effect of an HDMNet run."""
    cfg = compose_cfg(["model=hdmnet", "backbone=resnet50", "fold=2", *TINY])
    cfg.data.name = "pascal"  # any data other than synth
    with pytest.raises(ConfigError) as error:
        ensure_base_learner(cfg)
    message = str(error.value)
    assert "no base-learner (PSPNet) checkpoint for data=pascal fold=2 backbone=resnet50" in message
    assert "`python run.py model=pspnet data=pascal fold=2 backbone=resnet50`" in message
    assert str(Path(cfg.paths.cache_dir) / "base_learner") in message
    assert "base_learner.ckpt=" in message and "\n" not in message
    assert not (Path(cfg.paths.cache_dir) / "base_learner").exists() or not list(
        (Path(cfg.paths.cache_dir) / "base_learner").glob("*/best.pth"))


def test_configured_checkpoint_must_exist_and_backbone_must_be_pspnet(compose_cfg):
    cfg = compose_cfg(["model=hdmnet", "base_learner.ckpt=/no/such/best.pth", *TINY])
    with pytest.raises(ConfigError, match="base_learner.ckpt=/no/such/best.pth does not exist"):
        ensure_base_learner(cfg)
    cfg = compose_cfg(["model=hdmnet", "backbone.name=resnet18", *TINY])
    with pytest.raises(ConfigError, match="backbone=resnet18 has no PSPNet variant"):
        ensure_base_learner(cfg)


def test_cache_key_ignores_loader_settings_seed_and_paths_but_not_the_recipe(compose_cfg):
    base = base_learner_key(compose_cfg(["model=hdmnet"]))
    assert base == base_learner_key(compose_cfg(["model=pspnet"]))
    assert base == base_learner_key(compose_cfg(["model=hdmnet", "seed=3",
                                                 "data.semantic.num_workers=0"]))
    assert base != base_learner_key(compose_cfg(["model=hdmnet", "base_learner.max_epochs=9"]))
    assert base != base_learner_key(compose_cfg(["model=hdmnet", "fold=1"]))
    assert base != base_learner_key(compose_cfg(["model=hdmnet", "debug=fdr"]))
    # Real data: the model's episode augmentation reaches the data source, not the key.
    for data in ("pascal", "coco"):
        assert base_learner_key(compose_cfg(["model=pspnet", f"data={data}"])) == \
            base_learner_key(compose_cfg(["model=hdmnet", f"data={data}"]))
