"""Every experiment file's ``paper.targets`` equal the tables of the papers, as the project's
spec transcribes them (``../shared/spec/paper-tables.md`` beside the repository), number for
number; every table of that file is the target of at least one experiment file.

The spec is outside the repository: the comparison skips when it is absent (a fresh clone);
``tests/experiments/test_experiments.py`` checks what needs no spec (each file composes, cites the
paper only, and each mean agrees with its folds)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT.parent / "shared" / "spec" / "paper-tables.md"
EXPERIMENTS = ROOT / "experiments"
# Files with no published number (the synthetic benchmark, the base-learner stage).
NO_PAPER = {"hdmnet_synth", "synth_default", "synth_proto", "pspnet_folds"}
# Written alongside this one (Table A1's evaluation switch); checked when present.
OPTIONAL = {"hsnet_pascal_r101_noignore"}


def parse_tables(text: str) -> dict[tuple[str, str], list[list[str]]]:
    """(paper, section heading) -> the rows of its first Markdown table, as cell lists
    (header included; the ``|---|`` line dropped). Paper = the ``## `` heading."""
    tables: dict[tuple[str, str], list[list[str]]] = {}
    paper = section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            paper, section = line[3:].split()[0], ""
        elif line.startswith("### "):
            section = line[4:].strip()
        elif line.startswith("|") and section:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            rows = tables.setdefault((paper, section), [])
            if not rows or len(rows[-1]) == len(cells):
                rows.append(cells)
    return tables


class Spec:
    """The parsed tables, recording which ones the expected targets read."""

    def __init__(self, text: str):
        self.tables = parse_tables(text)
        self.used: set[tuple[str, str]] = set()

    def rows(self, paper: str, heading: str) -> list[list[str]]:
        """The data rows (header dropped) of the section whose heading starts with ``heading``."""
        keys = [k for k in self.tables if k[0] == paper and k[1].startswith(heading)]
        assert len(keys) == 1, f"paper-tables.md: {paper} '{heading}' matches {keys}"
        self.used.add(keys[0])
        return self.tables[keys[0]][1:]

    def row(self, paper: str, heading: str, *first: str) -> list[str]:
        """The row whose leading cells are ``first``."""
        found = [r for r in self.rows(paper, heading) if r[:len(first)] == list(first)]
        assert len(found) == 1, f"paper-tables.md: {paper} '{heading}' row {first}: {found}"
        return found[0]


def scores(cells: list[str], fbiou: bool = False) -> dict:
    """fold 0..3, mean (and FB-IoU) from consecutive cells."""
    values = [float(c) for c in cells]
    out = {0: values[0], 1: values[1], 2: values[2], 3: values[3], "mean": values[4]}
    if fbiou:
        out["fbiou"] = values[5]
    return out


def expected_targets(spec: Spec) -> dict[str, dict]:
    """Experiment file stem -> the targets it must hold."""
    out: dict[str, dict] = {}
    hs, hd = "HSNet", "HDMNet"
    backbones = {"vgg16": "VGG16", "r50": "ResNet50", "r101": "ResNet101"}
    for key, name in backbones.items():
        out[f"hsnet_pascal_{key}"] = {
            shot: scores(spec.row(hs, "Table 1:", name, str(shot))[2:], fbiou=True)
            for shot in (1, 5)}
        a, b = spec.row(hs, "Table 3:", name)[1:]
        out[f"hsnet_fss1000_{key}"] = {1: {"mean": float(a)}, 5: {"mean": float(b)}}
    out["hsnet_pascal_r101_nomask"] = {
        1: scores(spec.row(hs, "Table 1:", "ResNet101 † (no support feature masking)", "1")[2:],
                  fbiou=True),
        5: scores(spec.row(hs, "Table 1:", "ResNet101 †", "5")[2:], fbiou=True)}
    for key in ("r50", "r101"):
        name = backbones[key]
        out[f"hsnet_coco_{key}"] = {
            shot: scores(spec.row(hs, "Table 2:", name, str(shot))[2:], fbiou=True)
            for shot in (1, 5)}
        a, b = spec.row(hs, "Table 4:", name)[1:]
        out[f"hsnet_coco2pascal_{key}"] = {1: {"mean": float(a)}, 5: {"mean": float(b)}}
    out["hsnet_pascal_r101_noignore"] = {
        shot: scores(spec.row(hs, "Table A1:", "ResNet101", str(shot))[2:], fbiou=True)
        for shot in (1, 5)}
    for data, name in (("pascal", "PASCAL-5i"), ("coco", "COCO-20i")):
        k1, k5, k10 = spec.row(hs, "Table A2:", name)[1:]
        out[f"hsnet_{data}_r50_10shot"] = {1: {"mean": float(k1)}, 5: {"mean": float(k5)},
                                           10: {"mean": float(k10)}}

    def two_shots(row: list[str]) -> dict:  # "name | 1-shot f0..mean | 5-shot f0..mean | ..."
        return {1: scores(row[1:6]), 5: scores(row[6:11])}

    out["hsnet_kernels"] = {"pascal": {
        value: two_shots(spec.row(hs, "Table 5:", label))
        for value, label in (("dense", "original 4D"), ("separable", "separable 4D"),
                             ("center_pivot", "center-pivot 4D"))}}
    out["hsnet_ablation_taps"] = {"pascal": {
        value: two_shots(spec.row(hs, "Table A3", label)) for value, label in (
            ("shallow", "C_p shallow (smallest layer index of each level)"),
            ("deep", "C_p deep (largest layer index of each level)"),
            ("all", "C_p (all layers)"))}}
    out["hsnet_ablation_pyramid"] = {"pascal": {
        value: two_shots(spec.row(hs, "Table A4", label)) for value, label in (
            ("[4]", "C(3) = {C3}"), ("[3,4]", "C(2:3) = {C2, C3}"),
            ("[2,3,4]", "C = {C1, C2, C3}"))}}
    # Fig. 8 prints no numbers; its 3-layer model is the Table 1 ResNet101 model.
    out["hsnet_ablation_layers"] = {"pascal": {3: out["hsnet_pascal_r101"]}}
    out["hsnet_finetune"] = {}  # Fig. 9: curves, no printed numbers

    # HDMNet: main table means; COCO ResNet50 per fold from the supplement.
    for data, name in (("pascal", "PASCAL-5i"), ("coco", "COCO-20i")):
        for key, backbone in (("r50", "ResNet50"), ("vgg16", "VGG16")):
            a, b = spec.row(hd, "Main tables", name, backbone)[2:]
            out[f"hdmnet_{data}_{key}"] = {1: {"mean": float(a)}, 5: {"mean": float(b)}}
    for shot in (1, 5):
        per_fold = scores(spec.row(hd, "COCO-20i ResNet50 per fold", str(shot))[1:])
        assert per_fold["mean"] == out["hdmnet_coco_r50"][shot]["mean"]
        out["hdmnet_coco_r50"][shot] = per_fold
    components = spec.rows(hd, "Components")
    mean = {tuple(r[:4]): {"mean": float(r[4])} for r in components}
    full = mean["✓", "✓", "✓", "✓"]
    out["hdmnet_ablation_components"] = {"coco": {
        "dot": {False: {1: mean["✓", "✓", "–", "–"]}},
        "cosine": {False: {1: mean["✓", "✓", "✓", "–"]}, True: {1: full}}}}
    out["hdmnet_ablation_ensemble"] = {"coco": {True: {1: full}}}
    out["hdmnet_ablation_stages"] = {"coco": {
        stages: {1: {"mean": float(spec.row(hd, "Decoders", label)[1])}}
        for stages, label in ((1, "HDMNet S1 (1 stage)"), (2, "HDMNet S2"),
                              (3, "HDMNet S3 (default)"), (4, "HDMNet S4"))}}
    out["hdmnet_ablation_support_mask"] = {
        data: {value: {1: scores(spec.row(hd, "Supplement Table 1", name, label)[2:])}
               for value, label in ((True, "with"), (False, "without"))}
        for data, name in (("pascal", "PASCAL-5i"), ("coco", "COCO-20i"))}
    out["hdmnet_ablation_temperature"] = {"coco": {
        value: {1: scores(spec.row(hd, "Supplement Table 2", label)[1:])}
        for value, label in ((0.5, "0.5"), (1.0, "1 (default)"), (2.0, "2"), (5.0, "5"))}}
    # Supplement Table 3's default rows (with the backbone's ReLU) are the official model,
    # backbone_relu=false; fss has no switch for its "without" rows.
    out["hdmnet_ablation_backbone_relu"] = {"coco": {False: {
        shot: scores(spec.row(hd, "Supplement Table 3", str(shot), "with (default)")[2:])
        for shot in (1, 5)}}}
    return out


@pytest.fixture(scope="module")
def spec() -> Spec:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is absent (it lives beside the repository, not in it)")
    return Spec(SPEC.read_text())


def file_targets(stem: str) -> dict:
    return (yaml.safe_load((EXPERIMENTS / f"{stem}.yaml").read_text())["paper"]
            .get("targets") or {})


def test_every_experiment_file_holds_the_papers_numbers(spec):
    expected = expected_targets(spec)
    stems = {p.stem for p in EXPERIMENTS.glob("*.yaml")} - NO_PAPER
    unchecked = stems - set(expected)
    assert not unchecked, f"experiment files with no expected targets here: {unchecked}"
    missing = set(expected) - stems - OPTIONAL
    assert not missing, f"paper tables without an experiment file: {missing}"
    for stem in sorted(stems):
        assert file_targets(stem) == expected[stem], stem


def test_every_table_of_the_spec_is_a_target(spec):
    expected_targets(spec)
    tables = set(spec.tables)
    assert len(tables) >= 16, sorted(tables)  # 9 HSNet + 7 HDMNet tables, at least
    assert tables == spec.used, f"tables no experiment file reads: {sorted(tables - spec.used)}"


def test_parser_reads_rows_and_keeps_duplicate_headers():
    text = ("## HSNet (x)\n### Table 5: kernels\n| kernel | 1-shot f0 | mean | 5-shot f0 | mean |\n"
            "|---|---|---|---|---|\n| dense | 1.5 | 2.0 | 3.5 | 4.0 |\n\n## HDMNet (y)\n"
            "### Components (mean)\n| a | mIoU |\n|---|---|\n| ✓ | 50.0 |\n")
    tables = parse_tables(text)
    assert tables[("HSNet", "Table 5: kernels")] == [
        ["kernel", "1-shot f0", "mean", "5-shot f0", "mean"], ["dense", "1.5", "2.0", "3.5", "4.0"]]
    assert tables[("HDMNet", "Components (mean)")] == [["a", "mIoU"], ["✓", "50.0"]]
    assert Spec(text).row("HDMNet", "Components", "✓") == ["✓", "50.0"]


def _job(root: Path, name: str, overrides: list[str], metrics: dict) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (root / name / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize("stem,key,values,data", [
    ("hsnet_kernels", "model.net.kernel", ["dense", "center_pivot"], "pascal"),
    ("hdmnet_ablation_support_mask", "model.net.use_support_mask", [True, False], "coco"),
    ("hdmnet_ablation_temperature", "model.net.distill_temperature", [0.5, 1.0], "coco"),
    ("hdmnet_ablation_temperature", "model.net.distill_temperature", [0.5], "synth"),
])
def test_report_shows_the_target_of_each_ablation_row(tmp_path, stem, key, values, data):
    """An ablation sweep's metrics.json files (targets keyed by ``paper.by``, keys turned into
    strings by JSON): each row gets its own setting's paper mean; a dataset the paper did not
    use (synth) gets none."""
    from fss.report import write_report
    from fss.report.table import shot_targets

    paper = yaml.safe_load((EXPERIMENTS / f"{stem}.yaml").read_text())["paper"]
    stored = json.loads(json.dumps(paper["targets"]))
    root = tmp_path / "sweep"
    for number, value in enumerate(values):
        for fold in (0, 1):
            text = json.dumps(value) if not isinstance(value, str) else value
            overrides = [f"{key}={text}", f"experiment={stem}", f"fold={fold}"]
            block = {**paper, "targets": stored, "by": {"data.name": data, key: value}}
            _job(root, f"{number}{fold}_fold{fold}", overrides, {
                "model": "m", "data": data, "backbone": "b", "fold": fold, "shot": 1,
                "seed": 0, "mIoU": 50.0 + fold, "FB-IoU": 60.0, "overrides": overrides,
                "paper": block, "status": "ok"})
    report = write_report(root)
    with report.csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(values)
    for row, value in zip(rows, values, strict=True):
        text = json.dumps(value) if not isinstance(value, str) else value
        assert row["variant"] == (f"{key}={text}" if len(values) > 1 else "")
        table = paper["targets"].get(data, {})
        expected = table.get(value, {}).get(1) if table else None
        if expected is None:
            assert (row["paper"], row["Δ"]) == ("", "")
            assert shot_targets({**paper, "by": {"data.name": data, key: value}}, 1) == {}
        else:  # two folds of four scored: the paper's mean over those two folds
            assert float(row["paper"]) == pytest.approx((expected[0] + expected[1]) / 2)
            assert float(row["Δ"]) == pytest.approx(50.5 - float(row["paper"]))
