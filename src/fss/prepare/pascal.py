"""PASCAL VOC2012 + SBD -> ``VOC2012/{JPEGImages,SegmentationClassAug}`` (PASCAL-5i layout).

``SegmentationClassAug`` holds one palette PNG per image of VOC's segmentation set or of
SBD: the VOC annotation where there is one (its 255 object boundaries kept), otherwise
SBD's ``dataset/cls/<id>.mat`` (``GTcls.Segmentation``, read with ``scipy.io.loadmat``).
Values are class indices (0 background, 1..20, 255), written with the VOC palette.
``ImageSets/SegmentationAug/{trainaug,val}.txt`` list the usual 10,582 / 1,449 images
(trainaug = SBD train + SBD val + VOC train, minus VOC val).
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fss.data.io import check_label_values, save_bytes, save_label_png, voc_palette
from fss.prepare.common import Report, list_store
from fss.prepare.inputs import check_input, members
from fss.utils.errors import DataError

VOC_MEMBERS = re.compile(
    r"(?:^|/)(JPEGImages/[^/]+\.jpg|SegmentationClass/[^/]+\.png|"
    r"ImageSets/Segmentation/(?:train|val)\.txt)$"
)
SBD_MEMBERS = re.compile(r"(?:^|/)dataset/(cls/[^/]+\.mat|(?:train|val)\.txt)$")
NUM_CLASSES = 20

# Official counts (full downloads).
JPEG_COUNT = 17125
LABEL_COUNT = 12031
TRAINAUG_COUNT = 10582
VAL_COUNT = 1449
HSNET_TRAIN_PAIRS = (11394, 10255, 7797, 11594)
HSNET_TEST_PAIRS = (346, 451, 725, 346)
PFENET_SOURCE_COUNTS = {"pfenet/pascal/voc_sbd_merge_noduplicate.txt": 5953,
                        "pfenet/pascal/val.txt": 1449}


def _ids(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode().splitlines() if line.strip()]


def _stem(name: str) -> str:
    return Path(name).stem


def read_sbd_mat(data: bytes, name: str) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` file as (H, W) uint8."""
    from scipy.io import loadmat

    try:
        content = loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
        segmentation = np.asarray(content["GTcls"].Segmentation)
    except Exception as error:  # malformed .mat: many possible scipy errors
        raise DataError(f"cannot read the SBD annotation {name} ({type(error).__name__}: "
                        f"{error}); expected a MATLAB file with GTcls.Segmentation") from None
    if segmentation.ndim != 2:
        raise DataError(f"SBD annotation {name} has a {segmentation.ndim}-D Segmentation; "
                        "expected a 2-D class map")
    if segmentation.min() < 0 or segmentation.max() > 255:
        raise DataError(f"SBD annotation {name} has values outside 0..255")
    segmentation = segmentation.astype(np.uint8)
    check_label_values(segmentation, NUM_CLASSES, name)
    return segmentation


def prepare_pascal(args: argparse.Namespace) -> Report:
    voc_input = check_input(args.voc, "the VOC2012 download (--voc)")
    sbd_input = check_input(args.sbd, "the SBD download (--sbd)")
    out = Path(args.out).expanduser() / "VOC2012"
    images_dir, labels_dir = out / "JPEGImages", out / "SegmentationClassAug"
    palette = voc_palette()

    voc_ids: set[str] = set()
    voc_sets: dict[str, list[str]] = {}
    written = {"images": 0, "voc labels": 0, "sbd labels": 0}
    for name, read in tqdm(members(voc_input, VOC_MEMBERS), desc="VOC2012", unit="file",
                           mininterval=1.0):
        if name.endswith(".txt"):
            voc_sets[_stem(name)] = _ids(read())
        elif name.endswith(".jpg"):
            target = images_dir / Path(name).name
            if not target.is_file() or target.stat().st_size == 0:
                save_bytes(target, read())
                written["images"] += 1
        else:
            voc_ids.add(_stem(name))
            target = labels_dir / f"{_stem(name)}.png"
            if not target.is_file():
                with Image.open(io.BytesIO(read())) as image:
                    if image.mode not in ("P", "L"):
                        raise DataError(f"VOC annotation {name} has PIL mode {image.mode}; "
                                        "expected the palette PNGs of SegmentationClass")
                    label = np.array(image)
                check_label_values(label, NUM_CLASSES, name)
                save_label_png(target, label, palette)
                written["voc labels"] += 1
    if not voc_ids:
        raise DataError(f"no SegmentationClass/*.png in {voc_input}; expected the VOC2012 "
                        "trainval download (VOCdevkit/VOC2012/...)")

    sbd_sets: dict[str, list[str]] = {}
    sbd_ids: set[str] = set()
    for name, read in tqdm(members(sbd_input, SBD_MEMBERS), desc="SBD", unit="file",
                           mininterval=1.0):
        if name.endswith(".txt"):
            sbd_sets[_stem(name)] = _ids(read())
            continue
        image_id = _stem(name)
        sbd_ids.add(image_id)
        target = labels_dir / f"{image_id}.png"
        if image_id in voc_ids or target.is_file():  # VOC's annotation (with boundaries) wins
            continue
        save_label_png(target, read_sbd_mat(read(), name), palette)
        written["sbd labels"] += 1
    if not sbd_ids:
        raise DataError(f"no dataset/cls/*.mat in {sbd_input}; expected SBD's benchmark.tgz "
                        "(benchmark_RELEASE/dataset/cls/...)")

    voc_val = set(voc_sets.get("val", []))
    trainaug = sorted((set(sbd_sets.get("train", [])) | set(sbd_sets.get("val", []))
                       | set(voc_sets.get("train", []))) - voc_val)
    sets_dir = out / "ImageSets" / "SegmentationAug"
    save_bytes(sets_dir / "trainaug.txt", "".join(f"{i}\n" for i in trainaug).encode())
    save_bytes(sets_dir / "val.txt", "".join(f"{i}\n" for i in sorted(voc_val)).encode())

    missing = [i for i in trainaug + sorted(voc_val) if not (labels_dir / f"{i}.png").is_file()]
    if missing:
        raise DataError(f"{len(missing)} images of trainaug/val have no label map (first: "
                        f"{missing[0]}); the SBD or VOC input is incomplete")

    report = Report(f"PASCAL-5i written to {out}")
    report.count("JPEGImages", sum(1 for _ in images_dir.glob("*.jpg")), JPEG_COUNT)
    report.count("SegmentationClassAug label maps", sum(1 for _ in labels_dir.glob("*.png")),
                 LABEL_COUNT)
    report.count("  from VOC SegmentationClass", len(voc_ids))
    report.count("  from SBD cls/*.mat", len(sbd_ids - voc_ids))
    report.count("trainaug images", len(trainaug), TRAINAUG_COUNT)
    report.count("val images", len(voc_val), VAL_COUNT)
    report.count("written this run (images, VOC, SBD)",
                 f"{written['images']}, {written['voc labels']}, {written['sbd labels']}")
    if not args.no_list_check:
        check_lists(args, Path(args.out).expanduser(), report)
    if args.base_annotations:
        write_base_annotations(args, report)
    return report


def check_lists(args: argparse.Namespace, root: Path, report: Report) -> None:
    """Count the official lists' pairs whose image and label map exist under ``root``."""
    from fss.data.lists import hsnet_pascal_pairs, read_pair_list

    store = list_store(args)
    folder = root / "VOC2012"

    def present(image_id: str) -> bool:
        return ((folder / "JPEGImages" / f"{image_id}.jpg").is_file()
                and (folder / "SegmentationClassAug" / f"{image_id}.png").is_file())

    try:
        trn = [hsnet_pascal_pairs(store, "trn", fold) for fold in range(4)]
        val = [hsnet_pascal_pairs(store, "val", fold) for fold in range(4)]
        pfenet = {name: read_pair_list(store.read_bytes(name), name)
                  for name in PFENET_SOURCE_COUNTS}
    except DataError as error:
        report.note(f"official list check skipped: {error}")
        return
    for fold in range(4):
        pairs = [p for other in range(4) if other != fold for p in trn[other]]
        report.count(f"HSNet fold {fold} training pairs present",
                     sum(present(i) for i, _ in pairs), HSNET_TRAIN_PAIRS[fold])
    for fold in range(4):
        report.count(f"HSNet fold {fold} test pairs present",
                     sum(present(i) for i, _ in val[fold]), HSNET_TEST_PAIRS[fold])
    for name, pairs in pfenet.items():
        report.count(f"PFENet {Path(name).name} entries present",
                     sum((folder / i).is_file() and (folder / lb).is_file() for i, lb in pairs),
                     PFENET_SOURCE_COUNTS[name])


def write_base_annotations(args: argparse.Namespace, report: Report) -> None:
    """BAM/HDMNet's base annotations: ``base_annotation/pascal/{train,val}/<fold>/<id>.png``,
    the PFENet-protocol list images with base class j -> j + 1, novel classes -> 0."""
    from fss.data.pascal import PascalSource

    source = PascalSource(Path(args.out).expanduser(), protocol="pfenet", lists=list_store(args))
    write_base_label_maps(source, "pascal", Path(args.out).expanduser(), report)


def write_base_label_maps(source, dataset: str, root: Path, report: Report) -> None:
    """Shared by PASCAL and COCO: base-class label maps of the PFENet train / test lists."""
    from fss.data.episodes import base_label_lut
    from fss.data.io import read_label

    for fold in range(source.num_folds):
        lut = base_label_lut(fold, source.num_classes, source.num_folds, source.fold_scheme)
        for split, folder_name in (("train", "train"), ("test", "val")):
            target_dir = root / "base_annotation" / dataset / folder_name / str(fold)
            data_list = source.pfenet_lists(split, fold).data_list
            written = 0
            for _, label_path, _ in tqdm(data_list, desc=f"base {folder_name} fold {fold}",
                                         unit="img", mininterval=1.0):
                target = target_dir / Path(label_path).name
                if target.is_file():
                    continue
                label = read_label(source.folder / label_path, source.num_classes)
                save_label_png(target, lut[label])
                written += 1
            report.count(f"base annotations {folder_name}/{fold} ({written} written now)",
                         len(data_list))
