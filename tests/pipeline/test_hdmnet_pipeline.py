"""HDMNet through the real configs and pipeline: recipe selection, fast_dev_run end to end
(1- and 5-shot), frozen BatchNorms during fit, and every ablation config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from fss.pipeline import run

# Shared 2-core machine: one intra-op thread avoids OpenMP spin-waits under load.
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.image_size=65", "data.module.num_workers=0", "data.semantic.num_workers=0"]
FDR = [*TINY, "debug=fdr"]
ABLATIONS = sorted(p.stem for p in (ROOT / "experiments").glob("hdmnet_ablation_*.yaml"))


class BatchNormProbe(L.Callback):
    """Records, at every training batch, the BatchNorm layers that are in training mode."""

    seen: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        training = [name for name, module in pl_module.named_modules()
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training]
        type(self).seen.append(training)


def test_hdmnet_on_synth_selects_the_fast_recipe(compose_cfg):
    cfg = compose_cfg(["model=hdmnet", "data=synth", "fold=0"])
    assert cfg.backbone.name == "resnet_small"  # the default trunk when none is chosen
    # The benchmark's default scenes (HSNet's): PSPNet accepts 112² without the strict rule.
    assert cfg.data.image_size == 112 and cfg.base_learner.strict_size is False
    assert list(cfg.model.stages) == ["base_learner"]
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.model.scheduler._target_ == "fss.lightning.schedules.poly_lr"
    assert cfg.base_learner.max_epochs < 10  # the fast base learner, not BAM's 100 epochs
    five = compose_cfg(["model=hdmnet", "shot=5"])
    assert five.train_shot == 5 and five.model.net.shot == 5  # 5-shot is its own model
    chosen = compose_cfg(["model=hdmnet", "backbone=resnet50"])
    assert chosen.backbone.name == "resnet50"  # an explicit PSPNet trunk is kept
    for data in ("pascal", "coco"):  # the official trunk when none is chosen
        assert compose_cfg(["model=hdmnet", f"data={data}"]).backbone.name == "resnet50"
    # Other models keep their settings: no recipe for HSNet.
    hsnet = compose_cfg(["model=hsnet"])
    assert hsnet.backbone.name == "resnet18" and hsnet.data.image_size == 112
    assert hsnet.train_shot == 1


@pytest.mark.parametrize("model", ["hdmnet", "pspnet"])
def test_an_explicit_backbone_without_a_pspnet_variant_is_an_error(compose_cfg, model):
    from fss.stages.base_learner import check_backbone
    from fss.utils.errors import ConfigError

    cfg = compose_cfg([f"model={model}", "backbone=resnet18"])
    assert cfg.backbone.name == "resnet18"  # kept as given, never replaced
    with pytest.raises(ConfigError) as error:
        check_backbone(cfg)
    assert str(error.value) == (
        "backbone=resnet18 has no PSPNet variant (HDMNet's base learner); use "
        "backbone=resnet_small (synthetic) or resnet50|resnet101|vgg16")


def test_a_size_the_strict_pspnet_rule_rejects_is_an_error(compose_cfg):
    from fss.stages.base_learner import check_backbone
    from fss.utils.errors import ConfigError

    check_backbone(compose_cfg(["model=hdmnet", "base_learner.strict_size=true",
                                "data.image_size=113"]))
    with pytest.raises(ConfigError, match=r"data.image_size=105 or 113, or "
                                          r"base_learner.strict_size=false"):
        check_backbone(compose_cfg(["model=hdmnet", "base_learner.strict_size=true"]))


def test_cli_refuses_an_explicit_backbone_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "run.py", "model=hdmnet", "backbone=resnet18",
         f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: backbone=resnet18 has no PSPNet variant (HDMNet's base learner); "
                     "use backbone=resnet_small (synthetic) or resnet50|resnet101|vgg16"]
    assert not list((tmp_path / "cache").glob("**/best.pth"))  # failed before any training


def test_official_recipe_is_the_model_default(compose_cfg):
    cfg = compose_cfg(["model=hdmnet"])
    optimizer = instantiate(cfg.model.optimizer)
    assert optimizer.keywords["betas"] == [0.9, 0.999]
    assert optimizer.keywords["weight_decay"] == 0.01
    assert cfg.model.scheduler.power == 0.9
    # The synthetic recipe changes only the lr of the official optimizer.
    recipe = OmegaConf.load(ROOT / "conf" / "recipe" / "hdmnet_synth.yaml")
    assert set(recipe.model.optimizer) == {"lr"}
    official = OmegaConf.load(ROOT / "conf" / "model" / "hdmnet.yaml")
    assert official.optimizer.lr == 1e-4 and official.net.num_stages == 3


@pytest.mark.parametrize("shot", [1, 5])
def test_fast_dev_run_end_to_end(compose_cfg, shared_cache, tmp_path, shot):
    metrics = run(compose_cfg(["model=hdmnet", f"shot={shot}", *FDR], cache_dir=shared_cache))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    assert (written["model"], written["shot"], written["train_shot"]) == ("hdmnet", shot, shot)
    assert written["backbone"] == "resnet_small" and written["status"] == "ok"
    assert written["episodes"] == 2 and 0.0 <= written["mIoU"] <= 100.0
    assert list(shared_cache.glob("base_learner/synth-fold0-resnet_small-*/best.pth"))


def test_batchnorms_stay_frozen_during_fit_and_the_stage_logs_apart(compose_cfg, tmp_path):
    BatchNormProbe.seen.clear()
    probe = f"+callbacks.bn_probe._target_={__name__}.BatchNormProbe"
    cfg = compose_cfg([
        "model=hdmnet", *TINY, probe, "trainer.max_epochs=2", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "data.module.batch_size=2", "data.module.test_batch_size=2",
        "data.module.val_episodes=2", "data.module.test_episodes=2",
        "data.semantic.batch_size=2", "data.semantic.num_train_images=4",
        "data.semantic.num_val_images=2", "base_learner.max_epochs=1",
        "callbacks.progress_bar.refresh_rate=0",
    ])
    run(cfg)
    assert len(BatchNormProbe.seen) == 4  # 2 epochs x 2 batches, across a validation
    assert all(names == [] for names in BatchNormProbe.seen), BatchNormProbe.seen[0][:5]
    # The base learner trained first, as its own stage with its own CSV logs in the run dir.
    assert list((tmp_path / "base_learner").glob("version_*/metrics.csv"))
    assert list((tmp_path / "csv").glob("version_*/metrics.csv"))


def _sweep(name: str) -> dict[str, list[str]]:
    params = OmegaConf.load(ROOT / "experiments" / f"{name}.yaml").hydra.sweeper.params
    return {key: str(values).split(",") for key, values in params.items()}


def test_every_ablation_is_an_hdmnet_sweep():
    assert {"hdmnet_ablation_stages", "hdmnet_ablation_components", "hdmnet_ablation_temperature",
            "hdmnet_ablation_ensemble", "hdmnet_ablation_backbone_relu",
            "hdmnet_ablation_support_mask"} <= set(ABLATIONS)
    for name in ABLATIONS:
        text = (ROOT / "experiments" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_")
        assert "override /model: hdmnet" in text
        assert _sweep(name)


def _net(compose_cfg, experiment: str, overrides: dict[str, str]):
    cfg = compose_cfg([f"experiment={experiment}", *(f"{k}={v}" for k, v in overrides.items())])
    assert cfg.model.name == "hdmnet"
    return instantiate(cfg.model.net, weights=None, strict_size=False)


def test_stage_ablation_builds_one_to_four_stages(compose_cfg):
    for value in _sweep("hdmnet_ablation_stages")["model.net.num_stages"]:
        net = _net(compose_cfg, "hdmnet_ablation_stages", {"model.net.num_stages": value})
        transformer = net.transformer
        assert len(transformer.down_sample_layers) == int(value)
        assert len(transformer.match_layers) == len(transformer.parse_layers) == int(value)


def test_component_ablation_switches_matching_and_distillation(compose_cfg):
    sweep = _sweep("hdmnet_ablation_components")
    assert sweep == {"model.net.matching": ["dot", "cosine"],
                     "model.net.use_distill": ["false", "true"]}
    for matching in sweep["model.net.matching"]:
        for distill in sweep["model.net.use_distill"]:
            net = _net(compose_cfg, "hdmnet_ablation_components",
                       {"model.net.matching": matching, "model.net.use_distill": distill})
            assert net.use_distill is (distill == "true")
            assert all(stage[0].attn.attn.mode == matching
                       for stage in net.transformer.match_layers)


def test_temperature_ensemble_relu_and_mask_ablations(compose_cfg):
    temperatures = _sweep("hdmnet_ablation_temperature")["model.net.distill_temperature"]
    assert [float(t) for t in temperatures] == [0.5, 1.0, 2.0, 5.0]
    net = _net(compose_cfg, "hdmnet_ablation_temperature", {"model.net.distill_temperature": "5.0"})
    assert net.distill_temperature == 5.0

    on = _net(compose_cfg, "hdmnet_ablation_ensemble", {"model.net.use_ensemble": "true"})
    off = _net(compose_cfg, "hdmnet_ablation_ensemble", {"model.net.use_ensemble": "false"})
    assert on.ensemble is not None and off.ensemble is None
    assert not any("merge" in name for name, _ in off.named_modules() if "query_merge" not in name
                   and "supp_merge" not in name)
    assert on.num_trainable_parameters() - off.num_trainable_parameters() == 4  # 2 x (1x1, 2->1)

    for value in ("false", "true"):
        net = _net(compose_cfg, "hdmnet_ablation_backbone_relu", {"model.net.backbone_relu": value})
        assert net.backbone_relu is (value == "true")
        net = _net(compose_cfg, "hdmnet_ablation_support_mask", {"model.net.use_support_mask": value})
        assert net.use_support_mask is (value == "true")
    bam = _net(compose_cfg, "hdmnet_ablation_support_mask",
               {"model.net.support_mask_mode": "feature"})
    assert bam.support_mask_mode == "feature"


@pytest.mark.slow
def test_ablation_multirun_subprocess(tmp_path):
    """`python run.py -m experiment=...` runs the table (2 fast_dev_run jobs)."""
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=hdmnet_ablation_ensemble",
               *FDR, f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == 2
    assert all(json.loads(j.read_text())["status"] == "ok" for j in jobs)
