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
          "experiment", "recipe"]


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


def test_the_recipe_is_picked_by_model_and_data_and_named(compose_cfg):
    assert compose_cfg([]).recipe_name == "hsnet_synth"
    assert compose_cfg(["model=hdmnet", "data=pascal"]).recipe_name == "hdmnet_pascal"
    assert compose_cfg(["model=proto"]).recipe_name == "none"  # no proto_synth.yaml
    off = compose_cfg(["recipe=none"])
    assert off.recipe_name == "none" and off.trainer.max_epochs == 8  # trainer/default.yaml
    assert off.model.scheduler is None  # hsnet_synth.yaml's cosine decay is not applied
    chosen = compose_cfg(["recipe=hsnet_pascal"])
    assert chosen.recipe_name == "hsnet_pascal" and chosen.trainer.max_epochs == 2000


def test_the_job_says_which_recipe_and_trunk_were_chosen(compose_cfg):
    from fss.cli import describe_choices

    assert describe_choices(compose_cfg([])) == "recipe: hsnet_synth (auto)"


def test_optimizers_are_a_group_and_replace_the_whole_node(compose_cfg):
    # The base learner: BAM's SGD unless model=pspnet / hdmnet choose the data's optimizer.
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "lr": 2.5e-4,
           "weight_decay": 1e-4}
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3, "weight_decay": 1e-4}
    container = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    assert container(compose_cfg([]).base_learner.optimizer) == sgd
    for model in ("hdmnet", "pspnet"):
        assert container(compose_cfg([f"model={model}"]).base_learner.optimizer) == adamw
        assert container(compose_cfg([f"model={model}", "data=pascal"]).base_learner.optimizer) == sgd
    other = compose_cfg(["model=hdmnet", "optimizer@base_learner.optimizer=adam",
                         "base_learner.optimizer.lr=1e-3"])
    assert container(other.base_learner.optimizer) == {
        "_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    assert compose_cfg([]).model.optimizer._target_ == "torch.optim.Adam"
    assert compose_cfg([]).pretrain.optimizer._target_ == "torch.optim.AdamW"
    assert not (CONF / "recipe" / "parts").exists()


def test_data_configs_read_no_model_key(compose_cfg):
    for path in sorted((CONF / "data").glob("*.yaml")):
        settings = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        assert not [line for line in settings if "model." in line], path.name
    # HDMNet's episode augmentation reaches the data through its recipe.
    hdmnet = compose_cfg(["model=hdmnet", "data=coco"])
    assert OmegaConf.to_container(hdmnet.data.source.train_augmentation, resolve=True) == \
        OmegaConf.to_container(hdmnet.model.augmentation, resolve=True)
    assert hdmnet.data.source.train_augmentation.size == 633
    assert compose_cfg(["data=pascal"]).data.source.train_augmentation is None


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_comments_carry_no_machine_measurements(path):
    import re

    measurement = re.compile(r"\b(cpu cores?|\d+ cores|ms per|s per (step|episode)|"
                             r"\d+ min \d+ s|mIoU \d|\d+\.\d+ base-class)", re.IGNORECASE)
    comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]
    assert not [c for c in comments if measurement.search(c)]
