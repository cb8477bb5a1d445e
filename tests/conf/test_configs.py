"""Every config group option composes; bad values give one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fss.pipeline import validate
from fss.utils.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
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
    # The 10-shot experiment files (HSNet Table A2) fix shot; everything else keeps the default.
    assert cfg.fold == 0 and cfg.shot == (10 if option.endswith("_10shot") else 1)
    if group == "model":
        assert cfg.model.name == option
    if group == "backbone":
        # pspnet_<data>: PSPNet's default trunk on <data> (resnet_small / resnet50).
        expected = {"pspnet_synth": "resnet_small"}.get(option, option)
        if option.startswith("pspnet_") and option != "pspnet_synth":
            expected = "resnet50"
        assert cfg.backbone.name == expected


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


def _episodes(cfg, split: str, count: int):
    from hydra.utils import instantiate

    module = instantiate(cfg.data.module)
    dataset = module.test_dataset() if split == "test" else module.val_dataset()
    return [dataset[i] for i in range(count)]


def _resized(tensor, size: int, mode: str):
    import torch.nn.functional as F

    if tensor.shape[-1] == size:
        return tensor
    batched = tensor[None] if tensor.dim() == 3 else tensor[None, None]
    out = F.interpolate(batched.float(), size=(size, size), mode=mode)
    return out[0] if tensor.dim() == 3 else out[0, 0].to(tensor.dtype)


@pytest.mark.parametrize("split", ["test", "val"])
def test_hsnet_and_hdmnet_default_synth_runs_share_scenes_and_episodes(compose_cfg, split):
    """``python run.py`` (HSNet) and ``python run.py model=hdmnet`` draw the same episodes:
    the same class, query and supports for every index (up to resizing if a model's input
    size differed), from the same scene distribution."""
    hsnet = compose_cfg(["data.module.num_workers=0"])
    hdmnet = compose_cfg(["model=hdmnet", "data.module.num_workers=0"])
    assert (hsnet.model.name, hdmnet.model.name) == ("hsnet", "hdmnet")
    for key in ("level", "colour"):
        assert hsnet.data[key] == hdmnet.data[key]
    for key in ("test_episodes", "seed", "shot"):
        assert hsnet.data.module[key] == hdmnet.data.module[key]
    size = hsnet.data.image_size
    for a, b in zip(_episodes(hsnet, split, 6), _episodes(hdmnet, split, 6), strict=True):
        assert int(a["class_id"]) == int(b["class_id"])
        assert int(a["episode_index"]) == int(b["episode_index"])
        query = _resized(b["query_img"], size, "bilinear")
        assert (query - a["query_img"]).abs().mean() < 0.05
        mask = _resized(b["query_mask"], size, "nearest")
        valid = (mask != 255) & (a["query_mask"] != 255)
        assert bool((mask[valid] == a["query_mask"][valid]).float().mean() > 0.99)
        supports = _resized(b["support_imgs"], size, "bilinear")
        assert (supports - a["support_imgs"]).abs().mean() < 0.05
