"""``python -m fss.prepare``: tiny raw downloads in the official formats -> the loaders' layout.

The inputs come from ``fss.prepare.tiny`` (known rectangles per image), so every written
pixel can be checked: VOC vs SBD precedence and 255 boundaries, COCO polygons / RLE / crowd
RLE and their painting order, FSS-1000 copies, counts, resumption and the error messages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from PIL import Image

from fss.data.episodes import base_label_lut
from fss.prepare import main, tiny

ROOT = Path(__file__).resolve().parents[2]


def label(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    pascal = tiny.make_pascal_raw(folder / "pascal")
    coco = tiny.make_coco_raw(folder / "coco", per_class=1)
    names = [f"class{i:02d}" for i in range(6)]
    fss = tiny.make_fss_raw(folder / "fss", names)
    lists = folder / "lists"
    tiny.write_pascal_lists(lists, pascal)
    tiny.write_coco_lists(lists, coco)
    tiny.write_fss_lists(lists, {"trn": names[:2], "val": names[2:4], "test": names[4:]})
    return {"pascal": pascal, "coco": coco, "fss": fss, "names": names, "lists": lists}


def prepare(*args: str, out: Path, raw: dict, extra: tuple[str, ...] = ()) -> int:
    return main([*args, "--out", str(out), "--lists-dir", str(raw["lists"]),
                 "--cache-dir", str(out.parent / "cache"), "--no-verify-lists", *extra])


@pytest.fixture(scope="module")
def pascal_root(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pascal") / "data"
    tiny_pascal = raw["pascal"]
    assert prepare("pascal", "--voc", str(tiny_pascal.voc_tar), "--sbd",
                   str(tiny_pascal.sbd_tgz), "--base-annotations", out=out, raw=raw) == 0
    return out


# ------------------------------------------------------------------------------ PASCAL


def test_pascal_layout_and_label_sources(raw, pascal_root):
    tiny_pascal = raw["pascal"]
    voc = pascal_root / "VOC2012"
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == len(tiny_pascal.objects)
    labels = sorted(p.stem for p in (voc / "SegmentationClassAug").glob("*.png"))
    assert labels == sorted(set(tiny_pascal.trainaug) | set(tiny_pascal.voc_val))
    for image_id in labels:
        written = Image.open(voc / "SegmentationClassAug" / f"{image_id}.png")
        assert written.mode == "P" and written.getpalette()[3:6] == [128, 0, 0]
        from_voc = image_id in tiny_pascal.voc_train or image_id in tiny_pascal.voc_val
        expected = tiny.paint(tiny_pascal.size, tiny_pascal.objects[image_id], boundary=from_voc)
        np.testing.assert_array_equal(np.array(written), expected)
    # Annotated by both SBD and VOC: VOC's, with its 255 boundaries, wins.
    both = [i for i in tiny_pascal.sbd_val if i in tiny_pascal.voc_val]
    assert both and all(255 in label(voc / "SegmentationClassAug" / f"{i}.png") for i in both)
    sbd_only = [i for i in tiny_pascal.sbd_train]
    assert all(255 not in label(voc / "SegmentationClassAug" / f"{i}.png") for i in sbd_only)
    sets = voc / "ImageSets" / "SegmentationAug"
    assert (sets / "trainaug.txt").read_text().split() == tiny_pascal.trainaug
    assert (sets / "val.txt").read_text().split() == sorted(tiny_pascal.voc_val)


def test_pascal_base_annotations_remap_base_classes(raw, pascal_root):
    objects = raw["pascal"].objects
    folder = pascal_root / "base_annotation" / "pascal"
    lut = base_label_lut(0, 20)
    train = sorted((folder / "train" / "0").glob("*.png"))
    assert train
    for path in train:
        classes = {c for c, _ in objects[path.stem]}
        assert not classes & set(range(5))  # training images of fold 0 hold no novel class
        original = label(pascal_root / "VOC2012" / "SegmentationClassAug" / path.name)
        np.testing.assert_array_equal(label(path), lut[original])
    value = label(folder / "train" / "0" / "2008_000007.png")  # class 7 -> 3rd base class
    assert set(np.unique(value)) <= {0, 3, 255} and 3 in value
    for path in (folder / "val" / "0").glob("*.png"):
        assert not set(np.unique(label(path))) & {16, 17, 18, 19, 20}  # never above 15


def test_pascal_report_counts_and_strict(raw, pascal_root, capsys, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(pascal_root, out)
    tiny_pascal = raw["pascal"]
    args = ("pascal", "--voc", str(tiny_pascal.voc_tar), "--sbd", str(tiny_pascal.sbd_tgz))
    assert prepare(*args, out=out, raw=raw) == 0
    text = capsys.readouterr().out
    assert re.search(rf"trainaug images +{len(tiny_pascal.trainaug)}  DIFFERS from the "
                     "official 10582", text)
    assert re.search(r"written this run \(images, VOC, SBD\) +0, 0, 0", text)  # resumed
    assert "HSNet fold 0 training pairs present" in text
    assert prepare(*args, out=out, raw=raw, extra=("--strict",)) == 1


def test_pascal_resumes_only_missing_files(raw, pascal_root, tmp_path, capsys):
    out = tmp_path / "data"
    shutil.copytree(pascal_root, out)
    removed = out / "VOC2012" / "SegmentationClassAug" / f"{raw['pascal'].sbd_train[0]}.png"
    removed.unlink()
    (out / "VOC2012" / "JPEGImages" / "2008_000001.jpg").unlink()
    tiny_pascal = raw["pascal"]
    assert prepare("pascal", "--voc", str(tiny_pascal.voc_tar), "--sbd",
                   str(tiny_pascal.sbd_tgz), "--no-list-check", out=out, raw=raw) == 0
    assert "1, 0, 1" in capsys.readouterr().out
    assert removed.is_file()


def test_pascal_from_unpacked_folders(raw, tmp_path):
    tiny_pascal = raw["pascal"]
    for archive, target in ((tiny_pascal.voc_tar, "voc"), (tiny_pascal.sbd_tgz, "sbd")):
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path / target, filter="data")
    out = tmp_path / "data"
    assert prepare("pascal", "--voc", str(tmp_path / "voc" / "VOCdevkit"), "--sbd",
                   str(tmp_path / "sbd" / "benchmark_RELEASE"), "--no-list-check",
                   out=out, raw=raw) == 0
    assert len(list((out / "VOC2012" / "SegmentationClassAug").glob("*.png"))) == len(
        set(tiny_pascal.trainaug) | set(tiny_pascal.voc_val))


@pytest.mark.parametrize("case", ["missing", "not-archive", "no-annotations", "bad-mat"])
def test_pascal_bad_inputs_give_one_line(raw, tmp_path, capsys, case):
    tiny_pascal = raw["pascal"]
    voc, sbd = str(tiny_pascal.voc_tar), str(tiny_pascal.sbd_tgz)
    if case == "missing":
        voc, expected = str(tmp_path / "nope.tar"), f"{tmp_path / 'nope.tar'} does not exist"
    elif case == "not-archive":
        (tmp_path / "voc.rar").write_bytes(b"x")
        voc, expected = str(tmp_path / "voc.rar"), "neither a folder nor a .tar"
    elif case == "no-annotations":
        (tmp_path / "empty").mkdir()
        voc, expected = str(tmp_path / "empty"), "no SegmentationClass/*.png in"
    else:
        bad = tmp_path / "sbd" / "dataset" / "cls"
        bad.mkdir(parents=True)
        (bad / "2008_000001.mat").write_bytes(b"not a mat file")
        sbd, expected = str(tmp_path / "sbd"), "cannot read the SBD annotation dataset/cls/2008_000001.mat"
    status = prepare("pascal", "--voc", voc, "--sbd", sbd, "--no-list-check",
                     out=tmp_path / "data", raw=raw)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert status == 2 and last.startswith("error: ") and expected in last


# -------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco_root(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco") / "data"
    tiny_coco = raw["coco"]
    assert prepare("coco", "--images", *map(str, tiny_coco.image_zips), "--annotations",
                   str(tiny_coco.annotation_zip), "--workers", "1", out=out, raw=raw) == 0
    return out


def test_coco_masks_from_polygons_rle_and_crowd(raw, coco_root):
    tiny_coco = raw["coco"]
    for image_set, objects in tiny_coco.objects.items():
        for name, items in objects.items():
            assert (coco_root / "COCO2014" / image_set / name).is_file()
            mask = label(coco_root / "COCO2014" / "annotations" / image_set /
                         name.replace(".jpg", ".png"))
            expected = tiny.paint(tiny_coco.size, items)  # the smaller object painted last
            # Compare away from the rectangles' edges (polygon rasterisation conventions).
            near_edge = np.zeros(tiny_coco.size, dtype=bool)
            for _, (y0, y1, x0, x1) in items:
                near_edge[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
                near_edge[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = False
            np.testing.assert_array_equal(mask[~near_edge], expected[~near_edge], err_msg=name)
            if not items:
                assert not mask.any()  # an image without annotations: all background


def test_coco_rle_kinds_are_all_present(raw):
    import json
    import zipfile

    with zipfile.ZipFile(raw["coco"].annotation_zip) as archive:
        content = json.loads(archive.read("annotations/instances_train2014.json"))
    kinds = {(type(a["segmentation"]).__name__,
              type(a["segmentation"].get("counts")).__name__ if isinstance(
                  a["segmentation"], dict) else "", a["iscrowd"]) for a in content["annotations"]}
    assert kinds == {("list", "", 0), ("dict", "str", 0), ("dict", "list", 1)}


def test_coco_resumes_and_checks_lists(raw, coco_root, tmp_path, capsys):
    out = tmp_path / "data"
    shutil.copytree(coco_root, out)
    victim = next((out / "COCO2014" / "annotations" / "val2014").glob("*.png"))
    victim.unlink()
    tiny_coco = raw["coco"]
    assert prepare("coco", "--images", *map(str, tiny_coco.image_zips), "--annotations",
                   str(tiny_coco.annotation_zip), "--workers", "1", out=out, raw=raw) == 0
    text = capsys.readouterr().out
    assert re.search(r"val2014 masks written now +1\n", text)
    assert re.search(r"train2014 masks written now +0\n", text)
    assert "HSNet trn fold 0 images present" in text and "DIFFERS from the official 82783" in text
    assert victim.is_file()


def test_coco_images_missing_for_the_json_is_an_error(raw, tmp_path, capsys):
    tiny_coco = raw["coco"]
    status = prepare("coco", "--images", str(tiny_coco.image_zips[0]), "--annotations",
                     str(tiny_coco.annotation_zip), "--workers", "1", "--no-list-check",
                     out=tmp_path / "data", raw=raw)
    error = capsys.readouterr().err
    assert status == 2 and "are not in the --images inputs" in error and "val2014/" in error


# ---------------------------------------------------------------------------- FSS-1000


def test_fss1000_layout(raw, tmp_path, capsys):
    out = tmp_path / "data"
    assert prepare("fss1000", "--zip", str(raw["fss"]), out=out, raw=raw) == 0
    for name in raw["names"]:
        folder = out / "FSS-1000" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{i}.jpg" for i in range(1, 11)] + [f"{i}.png" for i in range(1, 11)])
    text = capsys.readouterr().out
    assert re.search(r"class folders +6  DIFFERS from the official 1000", text)
    assert re.search(r"HSNet trn classes present +2  DIFFERS from the official 520", text)


# -------------------------------------------------------------------------- the command


def test_console_script_and_module_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fss-prepare"] == "fss.prepare:main"
    assert {"scipy", "pycocotools"} <= set(project["dependencies"])
    done = subprocess.run([sys.executable, "-m", "fss.prepare", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0
    assert "pascal" in done.stdout and "coco" in done.stdout and "fss1000" in done.stdout
