"""episodes.csv: one row per test episode next to metrics.json, whose class-wise sums
reproduce the run's mIoU and FB-IoU, on synthetic data and on a tiny PASCAL tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fss.data import ListStore, PascalSource
from fss.metrics import episodes
from fss.pipeline import run
from tests.helpers.trees import prepared_pascal_tree

FAST = ["model=all_foreground", "mode=test", "backbone.weights=none", "data.image_size=48",
        "data.module.num_workers=0", "data.module.test_episodes=10",
        "data.module.test_batch_size=4", "logger=none", "callbacks=none"]
SIZE = 48


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pascal")
    prepared_pascal_tree(folder)
    return {"root": folder / "data", "lists": folder / "lists", "folder": folder}


def pascal_overrides(tree) -> list[str]:
    return ["model=all_foreground", "mode=test", "backbone.weights=none", "data=pascal",
            "fold=0", f"paths.data_root={tree['root']}", f"data.lists_dir={tree['lists']}",
            "data.lists_verify=false", f"data.image_size={SIZE}", "data.module.num_workers=0",
            "data.module.pin_memory=false", "data.module.test_episodes=9",
            "data.module.test_batch_size=4", "logger=none", "callbacks=none"]


def test_synthetic_run_writes_rows_that_reproduce_the_metric(compose_cfg, tmp_path):
    metrics = run(compose_cfg(FAST))
    rows = episodes.read(tmp_path / "episodes.csv")
    assert [r["index"] for r in rows] == list(range(10))
    assert {r["test_seed"] for r in rows} == {metrics["test_seed"]}
    assert all(r["query"].startswith("scene") for r in rows)
    assert all(len(r["supports"].split(";")) == 1 for r in rows)
    recomputed = episodes.scores(rows)
    assert recomputed["miou"] == pytest.approx(metrics["mIoU"], abs=0.005)
    assert recomputed["fbiou"] == pytest.approx(metrics["FB-IoU"], abs=0.005)
    # All-foreground: no background is predicted, every scored pixel is in the fg union.
    assert all(r["bg_intersection"] == 0 and r["bg_union"] == r["fg_union"] - r["fg_intersection"]
               and 0 < r["fg_union"] <= SIZE * SIZE for r in rows)


def test_multi_seed_run_writes_one_file_with_a_seed_column(compose_cfg, tmp_path):
    metrics = run(compose_cfg([*FAST, "test_seeds=[4,9]"]))
    rows = episodes.read(tmp_path / "episodes.csv")
    groups = episodes.by_seed(rows)
    assert list(groups) == [4, 9] and all(len(g) == 10 for g in groups.values())
    for seed_metrics in metrics["seeds"]:
        recomputed = episodes.scores(groups[seed_metrics["seed"]])
        assert recomputed["miou"] == pytest.approx(seed_metrics["mIoU"], abs=0.005)
        assert recomputed["fbiou"] == pytest.approx(seed_metrics["FB-IoU"], abs=0.005)
    assert groups[4][0]["query"] != groups[9][0]["query"]


def test_pascal_rows_name_the_lists_images_and_their_counts(compose_cfg, tree, tmp_path):
    metrics = run(compose_cfg([*pascal_overrides(tree), "eval_resolution=original"]))
    rows = episodes.read(tmp_path / "episodes.csv")
    store = ListStore(tree["lists"], tree["folder"] / "cache", verify=False)
    source = PascalSource(tree["root"], image_size=SIZE, lists=store)
    pairs = source.hsnet_pairs("test", 0)
    assert len(rows) == 9
    for row in rows:
        image_id, class_id = pairs[row["index"] % len(pairs)]
        assert (row["query"], row["class"]) == (image_id, class_id)
        support = row["supports"]
        assert support != image_id and (support, class_id) in pairs
        # All-foreground at the original size: the class's pixels and every non-boundary pixel.
        label = np.array(Image.open(tree["root"] / "VOC2012" / "SegmentationClassAug" /
                                    f"{image_id}.png"))
        assert row["fg_intersection"] == int((label == class_id + 1).sum())
        assert row["fg_union"] == int((label != 255).sum())
    recomputed = episodes.scores(rows)
    assert recomputed["miou"] == pytest.approx(metrics["mIoU"], abs=0.005)
    assert recomputed["fbiou"] == pytest.approx(metrics["FB-IoU"], abs=0.005)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["protocol"]["name"] == "hsnet"


def test_scoring_boundaries_as_background_counts_them(compose_cfg, tree, tmp_path):
    run(compose_cfg([*pascal_overrides(tree), "eval_resolution=original",
                     "data.ignore_boundary=false"]))
    rows = episodes.read(tmp_path / "episodes.csv")
    for row in rows:
        label = np.array(Image.open(tree["root"] / "VOC2012" / "SegmentationClassAug" /
                                    f"{row['query']}.png"))
        assert row["fg_union"] == label.size  # boundary pixels are now scored
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol"]["ignore_boundary"] is False


def test_scores_follow_the_class_wise_accumulation():
    rows = [
        {"class": 0, "fg_intersection": 1, "fg_union": 4, "bg_intersection": 3, "bg_union": 6},
        {"class": 0, "fg_intersection": 3, "fg_union": 4, "bg_intersection": 5, "bg_union": 6},
        {"class": 7, "fg_intersection": 0, "fg_union": 2, "bg_intersection": 8, "bg_union": 10},
    ]
    result = episodes.scores(rows)
    # class 0: 4/8, class 7: 0/2 -> 25 %; FB: fg 4/10, bg 16/22
    assert result["miou"] == pytest.approx(25.0)
    assert result["fbiou"] == pytest.approx((0.4 + 16 / 22) / 2 * 100)
