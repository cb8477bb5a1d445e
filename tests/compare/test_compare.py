"""fss-compare: the paired bootstrap on constructed runs with known answers, its refusals,
and two real synthetic runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fss.compare import bootstrap, compare, find_jobs, main
from fss.metrics import episodes
from fss.pipeline import run


def write_run(folder, rows_by_fold, protocol=None, shot=1):
    """A multirun-like directory: one job per fold with metrics.json and episodes.csv."""
    for fold, rows in rows_by_fold.items():
        job = folder / str(fold)
        job.mkdir(parents=True)
        scores = episodes.scores(rows)
        (job / "metrics.json").write_text(json.dumps({
            "data": "pascal", "fold": fold, "shot": shot, "status": "ok",
            "mIoU": scores["miou"], "FB-IoU": scores["fbiou"],
            "protocol": protocol or {"name": "hsnet", "test_episodes": 1000}}))
        episodes.write(job / episodes.FILENAME, rows)
    return folder


def make_rows(seed, count=60, classes=(0, 1, 2, 3, 4), better=0):
    """Random episodes; ``better`` pixels more foreground intersection on each episode."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        union = int(rng.integers(50, 200))
        inter = int(rng.integers(0, union - 10))
        rows.append({"test_seed": 0, "index": index, "class": classes[index % len(classes)],
                     "query": f"img{index}", "supports": f"img{index + 1}",
                     "fg_intersection": inter + better, "fg_union": union,
                     "bg_intersection": 900 - union, "bg_union": 1000})
    return rows


def test_identical_runs_give_zero_with_a_zero_width_interval(tmp_path):
    rows = {0: make_rows(1), 1: make_rows(2)}
    a = write_run(tmp_path / "a", rows)
    b = write_run(tmp_path / "b", rows)
    results = compare(a, b, resamples=200)
    for row in results.values():
        for metric in ("mIoU", "FB-IoU"):
            assert row["delta"][metric] == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_a_run_better_on_every_episode_has_an_interval_above_zero(tmp_path):
    a = write_run(tmp_path / "a", {0: make_rows(1), 2: make_rows(2)})
    b = write_run(tmp_path / "b", {0: make_rows(1, better=5), 2: make_rows(2, better=5)})
    results = compare(a, b, resamples=300)
    for name in ("pascal fold 0 1-shot", "pascal fold 2 1-shot", "overall"):
        delta = results[name]["delta"]["mIoU"]
        assert 0 < delta["low"] <= delta["value"] <= delta["high"]
    # The point estimate is the difference of the metrics recomputed from the files.
    fold0 = results["pascal fold 0 1-shot"]
    expected = (episodes.scores(make_rows(1, better=5))["miou"]
                - episodes.scores(make_rows(1))["miou"])
    assert fold0["delta"]["mIoU"]["value"] == pytest.approx(expected)
    assert results["overall"]["A"]["mIoU"] == pytest.approx(
        np.mean([results[f"pascal fold {f} 1-shot"]["A"]["mIoU"] for f in (0, 2)]))


def test_the_bootstrap_is_seeded_and_matches_a_direct_resample(tmp_path):
    a = write_run(tmp_path / "a", {0: make_rows(3, count=25)})
    b = write_run(tmp_path / "b", {0: make_rows(4, count=25)})
    # The same episodes' identity, different counts: make B's identity A's.
    rows_b = episodes.read(b / "0" / episodes.FILENAME)
    first = compare(a, b, resamples=100, seed=7)
    again = compare(a, b, resamples=100, seed=7)
    assert first == again
    # Independent resampling by hand with the same generator calls.
    rows_a = episodes.read(a / "0" / episodes.FILENAME)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 25, size=(100, 25))
    deltas = [episodes.scores([rows_b[i] for i in d])["miou"]
              - episodes.scores([rows_a[i] for i in d])["miou"] for d in draws]
    low, high = np.percentile(deltas, [2.5, 97.5])
    delta = first["pascal fold 0 1-shot"]["delta"]["mIoU"]
    assert delta["low"] == pytest.approx(low) and delta["high"] == pytest.approx(high)


def test_refusals_name_the_difference(tmp_path, capsys):
    a = write_run(tmp_path / "a", {0: make_rows(1), 1: make_rows(2)})
    other_fold = write_run(tmp_path / "b", {0: make_rows(1), 2: make_rows(2)})
    changed = make_rows(2)
    changed[17]["supports"] = "img99"
    other_episode = write_run(tmp_path / "c", {0: make_rows(1), 1: changed})
    other_protocol = write_run(tmp_path / "d", {0: make_rows(1), 1: make_rows(2)},
                               protocol={"name": "hsnet", "test_episodes": 5000})
    cases = [
        (other_fold, "the runs test different folds or shots: RUN_A has pascal fold 1"),
        (other_episode, "pascal fold 1 1-shot test seed 0: the episodes differ from index 17 "
                        "on (supports: 'img18' in RUN_A, 'img99' in RUN_B)"),
        (other_protocol, "different protocols (test_episodes: 1000 vs 5000)"),
    ]
    for b, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a), str(b), "--resamples", "10"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


FAST = ["mode=test", "backbone.weights=none", "data.image_size=48",
        "data.module.num_workers=0", "data.module.test_episodes=12",
        "data.module.test_batch_size=4", "logger=none", "callbacks=none"]


def compare_cli(a, b, capsys) -> str:
    capsys.readouterr()
    main([str(a), str(b), "--resamples", "50"])
    return capsys.readouterr().out


def test_two_synthetic_runs_end_to_end(compose_cfg, tmp_path, capsys):
    run(compose_cfg(["model=all_foreground", f"paths.output_dir={tmp_path / 'a'}", *FAST]))
    run(compose_cfg(["model=all_foreground", f"paths.output_dir={tmp_path / 'b'}", *FAST]))
    out = compare_cli(tmp_path / "a", tmp_path / "b", capsys)
    assert "synth fold 0 1-shot" in out and "overall" in out
    assert "+0.00 [ +0.00,  +0.00]" in out
    assert "paired bootstrap over episodes, 50 resamples" in out
    # The console script runs as a module too.
    help_text = subprocess.run([sys.executable, "-m", "fss.compare", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--resamples" in help_text


@pytest.mark.slow
def test_a_model_against_the_floor_end_to_end(compose_cfg, tmp_path, capsys):
    run(compose_cfg(["model=all_foreground", f"paths.output_dir={tmp_path / 'a'}", *FAST]))
    run(compose_cfg(["model=proto", "model.calibration.episodes=8",
                     "model.calibration.thresholds=5", f"paths.output_dir={tmp_path / 'b'}",
                     *FAST]))
    out = compare_cli(tmp_path / "a", tmp_path / "b", capsys)
    assert "synth fold 0 1-shot" in out
    results = bootstrap(find_jobs(tmp_path / "a", "RUN_A"), find_jobs(tmp_path / "b", "RUN_B"),
                        resamples=50)
    delta = results["overall"]["delta"]["mIoU"]
    assert delta["low"] <= delta["value"] <= delta["high"] and delta["value"] != 0
