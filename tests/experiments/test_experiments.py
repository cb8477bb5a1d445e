"""Experiment files (experiments/*.yaml): every command in a file's header composes, every
swept value reaches the config, and the paper-table files carry their published numbers in a
machine-readable ``paper`` block (read back from metrics.json by the sweep reports)."""

from __future__ import annotations

import copy
import re
import shlex
from numbers import Real
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fss.pipeline import validate

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
CONF = ROOT / "conf"
FILES = sorted(EXPERIMENTS.glob("*.yaml"))
# Files that reproduce a paper table; the synthetic ones have no published numbers.
PAPER_FILES = [
    f for f in FILES if f.stem.startswith(("hsnet_", "hdmnet_")) and "synth" not in f.stem
]
TARGET_KEYS = {0, 1, 2, 3, "mean", "fbiou"}  # a shot's entries: folds, their mean, FB-IoU


def header_commands(path: Path) -> list[list[str]]:
    """Overrides of the ``python run.py ...`` lines of the file's leading comment that run
    this experiment (``experiment=<stem>``), with ``\\`` continuations joined, ``-m``, trailing
    comments and the brackets of optional overrides (``[fold=1]``) removed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = "\n".join(lines).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if not line.startswith("python run.py"):
            continue
        line = re.sub(r"\s+#.*$", "", line)
        tokens = [t.strip("[]") for t in shlex.split(line)[2:] if t not in ("-m", "--multirun")]
        overrides = [t for t in tokens if "=" in t]
        if f"experiment={path.stem}" in overrides:
            commands.append(overrides)
    return commands or [[f"experiment={path.stem}"]]


def split_sweep(value: str) -> list[str]:
    """``0,1,2,3`` -> its values; a bracketed list (``[510,365]``) is one value."""
    parts, depth, current = [], 0, ""
    for char in value:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def sweep_axes(overrides: list[str], sweep_params: dict[str, str]) -> dict[str, list[str]]:
    """key -> its values, from the command's overrides (``fold=0,1,2,3``) and the file's
    ``hydra.sweeper.params`` (the command line wins, as in a Hydra multirun)."""
    axes: dict[str, list[str]] = {}
    for override in overrides:
        key, value = override.split("=", 1)
        axes[key] = split_sweep(value)
    for key, value in sweep_params.items():
        axes.setdefault(key, split_sweep(str(value)))
    return axes


def sweep_params(path: Path) -> dict[str, str]:
    raw = OmegaConf.load(path)
    return dict(OmegaConf.select(raw, "hydra.sweeper.params", default=None) or {})


def leaves(node, path=()):
    """(path, value) of every leaf of a nested mapping."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, node


def _cases():
    for path in FILES:
        for index, command in enumerate(header_commands(path)):
            yield pytest.param(path, command, id=f"{path.stem}-cmd{index}")


def _check_values(cfg, values: dict[str, str]) -> None:
    """Each ``key=value`` reached ``cfg`` (a group override: that option was chosen)."""
    for key, value in values.items():
        if (CONF / key).is_dir():
            if "name" in (cfg.get(key) or {}):
                assert cfg[key].name == value
            continue
        actual = OmegaConf.select(cfg, key)
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        assert actual == yaml.safe_load(value), (key, actual, value)


@pytest.mark.parametrize("path,command", list(_cases()))
def test_header_command_composes(compose_cfg, path, command):
    """The command with the first value of every swept key composes, resolves and passes
    validation; so does every other swept value (a config group's by composing again, a
    plain key's by setting it on the composed config, which refuses unknown keys)."""
    axes = sweep_axes(command, sweep_params(path))
    first = {key: values[0] for key, values in axes.items()}
    base = compose_cfg([f"{k}={v}" for k, v in first.items()])
    jobs = [(base, first)]
    for key, values in axes.items():
        for value in values[1:]:
            chosen = {**first, key: value}
            if (CONF / key).is_dir():
                jobs.append((compose_cfg([f"{k}={v}" for k, v in chosen.items()]), chosen))
            else:
                job = copy.deepcopy(base)
                OmegaConf.update(job, key, yaml.safe_load(value), merge=False)
                jobs.append((job, chosen))
    for cfg, chosen in jobs:
        OmegaConf.resolve(cfg)
        validate(cfg, this_machine=False)  # GPU experiments: their machines, not this one
        _check_values(cfg, chosen)


def test_header_commands_are_read_from_the_files():
    stages = header_commands(EXPERIMENTS / "hdmnet_ablation_stages.yaml")
    assert stages == [
        ["experiment=hdmnet_ablation_stages", "data=coco", "fold=0,1,2,3"],
        ["experiment=hdmnet_ablation_stages"],
    ]
    axes = sweep_axes(stages[0], sweep_params(EXPERIMENTS / "hdmnet_ablation_stages.yaml"))
    assert axes["model.net.num_stages"] == ["1", "2", "3", "4"] and axes["data"] == ["coco"]
    pascal = header_commands(EXPERIMENTS / "hdmnet_pascal_r50.yaml")
    assert pascal == [["experiment=hdmnet_pascal_r50", "fold=0,1,2,3", "shot=1,5", "trainer=ddp"]]
    assert sweep_axes(pascal[0], {})["shot"] == ["1", "5"]
    assert split_sweep("[510,365],[1,2]") == ["[510,365]", "[1,2]"]


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_block_has_source_and_numeric_targets(path):
    paper = OmegaConf.to_container(OmegaConf.load(path)).get("paper")
    assert isinstance(paper, dict), f"{path.name}: no top-level `paper` block"
    assert isinstance(paper.get("source"), str) and paper["source"].strip()
    assert paper.get("metric") == "mIoU"
    targets = paper.get("targets")
    assert isinstance(targets, dict), f"{path.name}: paper.targets must be a mapping"
    for where, value in leaves(targets):
        assert isinstance(value, Real) and not isinstance(value, bool), (path.name, where, value)
        assert 0.0 <= value <= 100.0, (path.name, where, value)
        assert where[-1] in TARGET_KEYS, (path.name, where)
    if not targets:  # only a figure without printed numbers, and the file says so
        assert "no printed numbers" in paper["source"], path.name
        assert "Expected shape" in path.read_text(), path.name
    depth = len(paper.get("by") or {})
    for where, _ in leaves(targets):  # the `by` values, then the shot, then fold/mean/fbiou
        assert len(where) == depth + 2, (path.name, where)
        assert isinstance(where[depth], int) and where[depth] >= 1, (path.name, where)


# Words that mark a number as unchecked: a target comes from the paper's own table or is
# absent; a file says which table, never where else it looked.
FORBIDDEN = ("not retrieved", "unverified", "secondary source", "issue #", "values not",
             "could not be", "public summary")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_experiment_files_cite_the_paper_only(path):
    text = path.read_text().lower()
    assert not [w for w in FORBIDDEN if w in text], path.name


@pytest.mark.parametrize(
    "path", [f for f in PAPER_FILES if "by" in (OmegaConf.load(f).get("paper") or {})],
    ids=lambda p: p.stem)
def test_by_settings_are_the_jobs_own_values(compose_cfg, path):
    """``paper.by`` names real settings, each resolved from the job's own config, so every
    job's metrics.json says which row of the table it is; the swept values of the file
    select a target (or, for values the paper has no row for, none)."""
    from fss.report.table import shot_targets

    command = header_commands(path)[0]
    axes = sweep_axes(command, sweep_params(path))
    first = {key: values[0] for key, values in axes.items()}
    cfg = compose_cfg([f"{k}={v}" for k, v in first.items()])
    raw = OmegaConf.load(path).paper.by
    for key in raw:
        assert OmegaConf.to_container(raw)[key] == "${" + key + "}", (path.name, key)
        assert OmegaConf.select(cfg, key) is not None, (path.name, key)
    found = 0
    swept = {k: v for k, v in axes.items() if k in raw}
    for key, values in swept.items():
        for value in values:
            job = copy.deepcopy(cfg)
            OmegaConf.update(job, key, yaml.safe_load(value), merge=False)
            paper = OmegaConf.to_container(job.paper, resolve=True)
            assert paper["by"][key] == yaml.safe_load(value), (path.name, key, value)
            found += bool(shot_targets(paper, job.shot) or shot_targets(paper, 5))
    assert found, f"{path.name}: no swept value of its header command selects a target"


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_mean_matches_its_folds(path):
    """A shot's ``mean`` is the mean of its four folds up to the table's rounding (each value
    rounded to 0.1: at most 0.1 apart), which catches a mistyped fold or mean."""
    targets = OmegaConf.to_container(OmegaConf.load(path))["paper"]["targets"]
    shots = {where[:-1] for where, _ in leaves(targets)}
    for shot in shots:
        row = targets
        for key in shot:
            row = row[key]
        if "mean" in row and all(fold in row for fold in range(4)):
            average = sum(row[fold] for fold in range(4)) / 4
            assert abs(average - row["mean"]) <= 0.1 + 1e-9, (path.name, shot, average, row)


# Learnable parameters of the official 1-shot model: 4,161,734 with ResNet-50 (spec); VGG-16
# only narrows down_query / down_supp (768 instead of 1536 input channels): 2 x 768 x 256 fewer.
R50_PARAMETERS = 4_161_734
VGG16_PARAMETERS = R50_PARAMETERS - 2 * 768 * 256


def test_hdmnet_main_tables_use_the_official_recipe(compose_cfg):
    expected = {  # file -> data, backbone, size, base classes, Table mean 1-shot / 5-shot
        "hdmnet_pascal_r50": ("pascal", "resnet50", 473, 15, 69.4, 71.8),
        "hdmnet_pascal_vgg16": ("pascal", "vgg16", 473, 15, 65.1, 69.3),
        "hdmnet_coco_r50": ("coco", "resnet50", 633, 60, 50.0, 56.0),
        "hdmnet_coco_vgg16": ("coco", "vgg16", 633, 60, 45.9, 52.4),
    }
    for name, (data, backbone, size, base, mean1, mean5) in expected.items():
        net = instantiate(compose_cfg([f"experiment={name}"]).model.net, weights=None)
        parameters = R50_PARAMETERS if backbone == "resnet50" else VGG16_PARAMETERS
        assert net.num_trainable_parameters() == parameters, name
        assert net.pspnet.num_classes == base + 1  # background + the fold's base classes
        cfg = compose_cfg([f"experiment={name}", "shot=5"])
        assert (cfg.data.name, cfg.backbone.name, cfg.model.name) == (data, backbone, "hdmnet")
        assert cfg.data.protocol == "pfenet" and cfg.model.augmentation.size == size
        assert cfg.model.net.num_classes_base == base and cfg.train_shot == 5
        assert list(cfg.test_seeds) == [510, 365, 382, 322, 988, 98, 742, 17, 595, 106]
        assert (cfg.paper.targets[1].mean, cfg.paper.targets[5].mean) == (mean1, mean5)


@pytest.mark.parametrize(
    "path", [f for f in FILES if f.stem.startswith("hdmnet_ablation_")], ids=lambda p: p.stem
)
def test_hdmnet_ablation_values_build_the_model(compose_cfg, path):
    """Every swept value is a valid HDMNet argument: the network builds (synthetic trunk,
    random base learner) and has the attribute the switch sets."""
    base = compose_cfg([f"experiment={path.stem}"])
    assert base.data.name == "synth" and base.model.net.backbone == "resnet_small"
    for key, values in sweep_params(path).items():
        attribute = key.removeprefix("model.net.")
        for value in split_sweep(str(values)):
            job = copy.deepcopy(base)
            OmegaConf.update(job, key, yaml.safe_load(value), merge=False)
            net = instantiate(job.model.net, weights=None)
            if attribute == "num_stages":
                assert net.transformer.num_stages == int(value)
            elif attribute == "matching":
                modes = {getattr(m, "mode", None) for m in net.transformer.match_layers.modules()}
                assert modes - {None} == {value}
            elif attribute == "use_ensemble":
                assert (net.ensemble is not None) == (value == "true")
            else:
                assert getattr(net, attribute) == yaml.safe_load(value)


def test_docs_list_every_paper_table_with_command_and_targets():
    """docs/experiments.md's catalogue is `python -m fss.report.catalog` verbatim."""
    from fss.report.catalog import read_entries, summarize_targets, to_markdown

    entries = read_entries()
    names = {e.name for e in entries}
    assert {"hsnet_pascal_r50", "hsnet_coco_r101", "hsnet_fss1000_vgg16", "hsnet_kernels",
            "hdmnet_pascal_r50", "hdmnet_coco_r50"} <= names
    assert next(e for e in entries if e.name == "hsnet_pascal_r50").targets == \
        "1-shot 64.0, 5-shot 69.5"
    assert summarize_targets({"dense": {1: {"mean": 64.9}}, "cp": {1: {0: 1.0}}}) == \
        "dense: 1-shot 64.9"
    by = {"data.name": "coco", "model.net.use_distill": True}
    assert summarize_targets({"coco": {True: {1: {"mean": 50.0}}, False: {1: {0: 1.0}}}},
                             by) == "coco use_distill=true: 1-shot 50.0"
    assert summarize_targets({}) == "no printed numbers (see the file)"
    assert next(e for e in entries if e.name == "hsnet_pascal_r50_10shot").targets == \
        "1-shot 64.0, 5-shot 69.5, 10-shot 70.6"
    page = (ROOT / "docs" / "experiments.md").read_text()
    assert to_markdown(entries) in page, \
        "docs/experiments.md's catalogue out of date: python -m fss.report.catalog"
