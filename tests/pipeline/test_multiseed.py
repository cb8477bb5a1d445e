"""``test_seeds``: one set of weights tested on several episode seeds; each, the mean and a
95 % interval land in metrics.json."""

from __future__ import annotations

import json
import math

import pytest

from fss.pipeline import mean_ci95, run, validate
from fss.utils.errors import ConfigError

# A training-free model on tiny synthetic episodes: the test pass is all that runs.
FAST = ["model=all_foreground", "mode=test", "backbone.weights=none", "data.image_size=48",
        "data.module.num_workers=0",
        "data.module.test_episodes=10", "data.module.test_batch_size=5", "logger=none",
        "callbacks=none"]


def test_mean_and_interval_by_hand():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    # t(0.975, 2 dof) = 4.302653; standard error = 1 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci95([5.0]) == (5.0, None)


def test_every_seed_is_reported_and_matches_a_single_run(compose_cfg, tmp_path):
    metrics = run(compose_cfg([*FAST, "test_seeds=[3,11,3]"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    assert [s["seed"] for s in written["seeds"]] == [3, 11, 3]
    first, second, repeat = written["seeds"]
    assert first == repeat and first != second  # other episodes, same weights
    miou = [s["mIoU"] for s in written["seeds"]]
    mean, half = mean_ci95(miou)  # the written ones come from the unrounded scores
    assert written["mIoU_mean"] == pytest.approx(mean, abs=0.02)
    assert written["mIoU_ci95"] == pytest.approx(half, abs=0.05) and half > 0
    assert written["mIoU"] == pytest.approx(written["mIoU_mean"], abs=0.01)
    assert "FB-IoU_mean" in written and "FB-IoU_ci95" in written
    assert written["episodes"] == 10  # per seed
    single = run(compose_cfg([*FAST, "+data.module.test_seed=11"]))
    assert single["mIoU"] == second["mIoU"] and single["FB-IoU"] == second["FB-IoU"]
    assert single["test_seed"] == 11 and "seeds" not in single


@pytest.mark.parametrize("value", ["[]", "[-1]", "[1.5]", "7", "[a]"])
def test_bad_seed_lists_give_one_line(compose_cfg, value):
    cfg = compose_cfg([f"test_seeds={value}"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "must be null or a non-empty list of integers >= 0" in str(error.value)


def test_the_summary_prints_the_seeds(compose_cfg, capsys):
    from fss.pipeline import print_summary

    print_summary(run(compose_cfg([*FAST, "test_seeds=[1,2]"])))
    text = capsys.readouterr().out
    assert "per test seed" in text and "Mean over 2 test seeds: mIoU" in text and "95 %" in text
