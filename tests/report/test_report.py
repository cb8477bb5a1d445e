"""fss-report on fake multirun directories laid out as Hydra and the pipeline write them.

(A real 2-fold multirun aggregated by the report: tests/pipeline/test_pipeline.py.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fss.report import main, write_report

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
PAPER = {  # as metrics.json stores it: JSON turns the int keys of the YAML into strings
    "source": "HSNet (ICCV 2021) Table 1", "metric": "mIoU",
    "targets": {"1": {"0": 64.3, "1": 70.7, "2": 60.3, "3": 60.5, "mean": 64.0, "fbiou": 76.5},
                "5": {"0": 70.3, "1": 73.2, "2": 67.4, "3": 67.1, "mean": 69.5, "fbiou": 80.6}},
}


def write_multirun_yaml(root: Path, task: list[str], params: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    config = {"hydra": {"sweeper": {"_target_": BASIC_SWEEPER, "max_batch_size": None,
                                    "params": params},
                        "overrides": {"task": task}}}
    OmegaConf.save(OmegaConf.create(config), root / "multirun.yaml")


def write_job(root: Path, name: str, overrides: list[str], metrics: dict | None,
              config: dict | None = None) -> Path:
    """A job directory: .hydra/overrides.yaml (+ config.yaml) and metrics.json if given."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if config is not None:
        OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return job


def ok_metrics(fold: int, shot: int, miou: float, fbiou: float, overrides: list[str],
               **identity) -> dict:
    return {"model": "hsnet", "data": "pascal", "backbone": "resnet50", "fold": fold,
            "shot": shot, "seed": 0, **identity, "episodes": 1000, "mIoU": miou,
            "FB-IoU": fbiou, "overrides": overrides, "paper": PAPER, "status": "ok"}


@pytest.fixture
def table_sweep(tmp_path) -> Path:
    """experiment=hsnet_pascal_r50 fold=0,1,2,3 shot=1,5: 1-shot complete; 5-shot fold 2
    failed (the CLI's failure record: no overrides, no paper), fold 3 never started."""
    root = tmp_path / "sweep"
    write_multirun_yaml(root, ["experiment=hsnet_pascal_r50", "fold=0,1,2,3", "shot=1,5"])
    results = {(0, 1): (63.1, 75.0), (0, 5): (70.0, 80.0), (1, 1): (70.9, 77.0),
               (1, 5): (72.5, 81.0), (2, 1): (59.8, 74.0), (3, 1): (61.2, 76.0)}
    number = 0
    for fold in range(4):
        for shot in (1, 5):
            overrides = ["experiment=hsnet_pascal_r50", f"fold={fold}", f"shot={shot}"]
            name = f"{number}_fold{fold}_shot{shot}"
            number += 1
            if (fold, shot) == (3, 5):
                continue  # never started: no directory
            if (fold, shot) == (2, 5):
                failure = {"model": "hsnet", "data": "pascal", "backbone": "resnet50",
                           "fold": fold, "shot": shot, "seed": 0, "status": "failed",
                           "error": "RuntimeError: CUDA out of memory\nTried to allocate 2 GiB",
                           "traceback": "..."}
                write_job(root, name, overrides, failure)
                continue
            write_job(root, name, overrides, ok_metrics(fold, shot, *results[fold, shot], overrides))
    return root


# The seed and protocol columns of a row of one-seed jobs without a protocol record.
ONE_SEED_NO_PROTOCOL = {"seeds": "", "± 95 % (seeds)": "", "best of N seeds": "", "protocol": ""}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def markdown_rows(text: str) -> list[list[str]]:
    """The table of report.md as cells (header first, separator left out)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]


def test_paper_table_with_failed_and_missing_jobs(table_sweep, capsys):
    main([str(table_sweep)])
    printed = capsys.readouterr().out
    assert "Sweep report" in printed and "5_fold2_shot5" in printed

    rows = read_csv(table_sweep / "report.csv")
    assert rows == [
        {"model": "hsnet", "data": "pascal", "backbone": "resnet50", "shot": "1", "variant": "",
         "fold0": "63.10", "fold1": "70.90", "fold2": "59.80", "fold3": "61.20", "folds": "4/4",
         "mean": "63.75", "FB-IoU": "75.50", "paper": "64.00", "Δ": "-0.25",
         "paper FB-IoU": "76.50", **ONE_SEED_NO_PROTOCOL},
        # Fold 2 failed and fold 3 never ran: mean over folds 0-1, compared with the paper's
        # folds 0-1 ((70.3 + 73.2) / 2 = 71.75), not with its 4-fold mean.
        {"model": "hsnet", "data": "pascal", "backbone": "resnet50", "shot": "5", "variant": "",
         "fold0": "70.00", "fold1": "72.50", "fold2": "failed", "fold3": "", "folds": "2/4",
         "mean": "71.25", "FB-IoU": "80.50", "paper": "71.75", "Δ": "-0.50",
         "paper FB-IoU": "80.60", **ONE_SEED_NO_PROTOCOL},
    ]

    markdown = (table_sweep / "report.md").read_text()
    table = markdown_rows(markdown)
    assert table[0][:5] == ["model", "data", "backbone", "shot", "variant"]
    assert table[0][5:] == ["fold0", "fold1", "fold2", "fold3", "folds", "mean", "FB-IoU",
                            "paper", "Δ", "paper FB-IoU", *ONE_SEED_NO_PROTOCOL]
    assert table[1] == ["hsnet", "pascal", "resnet50", "1", "", "63.10", "70.90", "59.80",
                        "61.20", "4/4", "63.75", "75.50", "64.00", "-0.25", "76.50", "", "", "",
                        ""]
    assert table[2] == ["hsnet", "pascal", "resnet50", "5", "", "70.00", "72.50", "failed", "—",
                        "2/4", "71.25", "80.50", "71.75", "-0.50", "80.60", "", "", "", ""]
    assert "7 job directories (6 ok, 1 failed); the sweep launches 8 jobs, 1 never started." \
        in markdown
    assert "Paper numbers: HSNet (ICCV 2021) Table 1 (mIoU)." in markdown
    assert ("## Failed jobs\n\n- `5_fold2_shot5` (hsnet resnet50 fold 2 5-shot seed 0): "
            "RuntimeError: CUDA out of memory\n") in markdown
    assert "## Jobs never started\n\n- fold=3 shot=5: no job directory" in markdown
    assert ("## Incomplete rows\n\n- hsnet / pascal / resnet50 / 5-shot: fold 2 failed; "
            "fold 3 not run; mean over folds 0, 1\n") in markdown


def test_out_directory_and_strict_exit_code(table_sweep, tmp_path):
    out = tmp_path / "elsewhere"
    with pytest.raises(SystemExit) as exited:
        main([str(table_sweep), "--out", str(out), "--strict"])
    assert exited.value.code == 1  # a failed and a never-started job
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    assert not (table_sweep / "report.md").exists()


def test_ablation_sweep_rows_and_a_job_without_result(tmp_path):
    """hydra.sweeper.params of an ablation experiment x fold=0,1: one row per switch value;
    a started job with no metrics.json is read from its .hydra/config.yaml."""
    root = tmp_path / "ablation"
    write_multirun_yaml(root, ["experiment=hdmnet_ablation_stages", "fold=0,1"],
                        params={"model.net.num_stages": "1,2"})
    values = {(1, 0): 40.0, (1, 1): 45.5, (2, 0): 48.25}
    number = 0
    for stages in (1, 2):
        for fold in (0, 1):
            overrides = [f"model.net.num_stages={stages}", "experiment=hdmnet_ablation_stages",
                         f"fold={fold}"]
            name = f"{number}_fold{fold}_shot1"
            number += 1
            if (stages, fold) == (2, 1):
                config = {"model": {"name": "hdmnet"}, "data": {"name": "synth"},
                          "backbone": {"name": "resnet_small"}, "fold": 1, "shot": 1, "seed": 0}
                write_job(root, name, overrides, None, config)
                continue
            metrics = ok_metrics(fold, 1, values[stages, fold], 70.0, overrides, model="hdmnet",
                                 data="synth", backbone="resnet_small")
            metrics["paper"] = None
            write_job(root, name, overrides, metrics)

    report = write_report(root)
    rows = read_csv(report.csv)
    assert [(r["model"], r["variant"], r["fold0"], r["fold1"], r["mean"]) for r in rows] == [
        ("hdmnet", "model.net.num_stages=1", "40.00", "45.50", "42.75"),
        ("hdmnet", "model.net.num_stages=2", "48.25", "no result", "48.25"),
    ]
    assert [(r["folds"], r["paper"], r["Δ"]) for r in rows] == [("2/4", "", ""), ("1/4", "", "")]
    markdown = report.markdown.read_text()
    assert ("## Jobs without metrics.json\n\n- `3_fold1_shot1` (hdmnet resnet_small fold 1 "
            "1-shot seed 0): still running") in markdown
    assert "the sweep launches 4 jobs, 0 never started" in markdown
    assert "No job records the paper's numbers" in markdown


def test_directory_without_any_metrics_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: no metrics.json under {tmp_path}; pass a multirun directory such "
                     "as logs/multiruns/<date_time>")
    write_job(tmp_path, "0_fold0_shot1", ["fold=0"], None)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "(1 job directory without one: still running, or killed)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "absent")])
    assert exited.value.code == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_sweep_over_models_is_one_directory_and_one_report(tmp_path):
    """``python run.py -m model=hsnet,hdmnet`` (fast_dev_run, tiny scenes): both jobs write
    into one multirun directory, in sub-directories named after their model, and the report
    of that directory lists both; the rows show the data settings that differ."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PROJECT_ROOT": str(root), "PYTHONPATH": str(root / "src")}
    logs = tmp_path / "logs"
    command = [sys.executable, str(root / "run.py"), "-m", "model=hsnet,hdmnet", "debug=fdr",
               "data.image_size=64", f"paths.log_dir={logs}", f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (logs / "multiruns").iterdir()
    assert sorted(p.name for p in logs.iterdir()) == ["multiruns"]
    jobs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert jobs == ["0_hsnet_synth_fold0_shot1", "1_hdmnet_synth_fold0_shot1"]
    report = write_report(sweep)
    assert [(row.model, row.jobs[0].status) for row in report.rows] == [("hsnet", "ok"),
                                                                          ("hdmnet", "ok")]
    assert "the sweep launches 2 jobs, 0 never started" in report.markdown.read_text()
    settings = [row.jobs[0].metrics["data_settings"] for row in report.rows]
    assert settings[0]["data.level"] == settings[1]["data.level"] == "hard"
    assert settings[0]["data.image_size"] == settings[1]["data.image_size"] == 64


def test_rows_show_the_data_settings_that_differ(tmp_path):
    """Two jobs of one model on different scenes get their own rows, each naming its
    differing settings as overrides; settings every job shares stay out of the table, and a
    failure record (which has none) does not make every other row differ."""
    root = tmp_path / "sweep"
    shared = {"data.image_size": 112, "data.module.test_episodes": 1000, "test_seeds": None}
    for number, (level, episodes) in enumerate([("hard", 800), ("demo", 640)]):
        metrics = ok_metrics(0, 1, 50.0 + number, 70.0, [], model="hdmnet", data="synth",
                             backbone="resnet_small")
        metrics["data_settings"] = {**shared, "data.level": level,
                                    "data.module.train_episodes": episodes}
        write_job(root, f"{number}_hdmnet_synth_fold0_shot1", [], metrics)
    failure = {"model": "hdmnet", "data": "synth", "backbone": "resnet_small", "fold": 1,
               "shot": 1, "seed": 0, "status": "failed", "error": "ValueError: x"}
    write_job(root, "2_hdmnet_synth_fold1_shot1", [], failure)
    rows = read_csv(write_report(root).csv)
    assert [(r["variant"], r["fold0"], r["fold1"]) for r in rows] == [
        ("data.level=hard data.module.train_episodes=800", "50.00", ""),
        ("data.level=demo data.module.train_episodes=640", "51.00", ""),
        ("", "", "failed"),
    ]
