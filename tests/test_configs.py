"""Every config group option composes; bad values give one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fss.pipeline import validate
from fss.utils.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "backbone", "data", "trainer", "logger", "callbacks", "debug", "pretrain",
          "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_group_option_composes(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.fold == 0 and cfg.shot == 1
    if group == "model":
        assert cfg.model.name == option
    if group == "backbone":
        assert cfg.backbone.name == option


def test_issue_command_composes(compose_cfg):
    cfg = compose_cfg(["model=hsnet", "data=synth", "fold=1", "shot=5", "backbone=resnet101"])
    assert (cfg.fold, cfg.shot, cfg.backbone.name) == (1, 5, "resnet101")
    assert cfg.model.net.backbone == "resnet101"
    assert cfg.data.module.shot == 5 and cfg.data.module.fold == 1
    # Synthetic data never downloads: the trunk comes from base-class pretraining.
    assert cfg.backbone.weights == "pretrain"


@pytest.mark.parametrize(
    "override,message",
    [
        ("fold=4", "fold=4 is out of range; accepted: 0, 1, 2, 3"),
        ("shot=0", "shot=0 must be an integer >= 1"),
        ("train_shot=-1", "train_shot=-1 must be an integer >= 1"),
        ("mode=eval", "mode='eval' is not supported"),
        ("backbone.weights=/no/such/file.pth", "is not a file; accepted: none, imagenet"),
        ("ckpt_path=/no/such.ckpt", "does not exist"),
    ],
)
def test_bad_values_give_one_line_errors(compose_cfg, override, message):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override", ["model=nope", "data=nope", "backbone=resnet7"])
def test_unknown_names_list_the_accepted_ones(compose_cfg, override):
    group = override.split("=")[0]
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg([override])
    text = str(error.value)
    assert f"Could not find '{group}/" in text
    for accepted in options(group):
        assert accepted in text
