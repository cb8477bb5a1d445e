"""COCO 2014 -> ``COCO2014/{train2014,val2014}`` images and class-index masks.

Masks: ``COCO2014/annotations/<set>/<image name>.png``, one byte per pixel: 0 background,
``c + 1`` for class ``c`` (the ``c``-th of the 80 COCO categories in id order), as HSNet's
masks. Every instance (polygons, RLE and crowd RLE alike, rasterised by pycocotools) is
painted largest first, so a smaller object lying on a larger one stays visible. Every image
of the instances JSON gets a mask (all zeros without annotations).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fss.data.io import save_bytes, save_label_png
from fss.prepare.common import Report, list_store
from fss.prepare.inputs import check_input, members
from fss.prepare.pascal import write_base_label_maps
from fss.utils.errors import DataError

IMAGE_MEMBERS = re.compile(r"(?:^|/)(?:train|val)2014/[^/]+\.jpg$")
ANNOTATION_MEMBERS = re.compile(r"(?:^|/)instances_(?:train|val)2014\.json$")
IMAGE_SETS = ("train2014", "val2014")
# The 80 category ids of COCO's instances annotations; class c is the c-th of them.
CATEGORY_IDS = tuple(i for i in range(1, 91)
                     if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
CLASS_OF_CATEGORY = {category: index for index, category in enumerate(CATEGORY_IDS)}
IMAGE_COUNTS = {"train2014": 82783, "val2014": 40504}

_COCO = None  # the annotation index of the set being rasterised (shared with forked workers)


def load_instances(data: bytes, name: str):
    """A pycocotools ``COCO`` index of an instances JSON given as bytes."""
    from pycocotools.coco import COCO

    try:
        content = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"cannot parse {name} ({error}); is the download complete?") from None
    for key in ("images", "annotations", "categories"):
        if key not in content:
            raise DataError(f"{name} has no {key!r}; expected a COCO instances JSON")
    unknown = sorted({c["id"] for c in content["categories"]} - set(CATEGORY_IDS))
    if unknown:
        raise DataError(f"{name} has category ids {unknown[:5]} outside COCO's 80 classes")
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def rasterise(image_id: int, coco=None) -> np.ndarray:
    """(H, W) uint8 class-index mask of one image (see the module docstring)."""
    coco = coco or _COCO
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    annotations = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: -float(a["area"]))
    for annotation in annotations:
        if annotation["category_id"] not in CLASS_OF_CATEGORY:
            raise DataError(f"annotation {annotation['id']} of image {info['file_name']} has "
                            f"category {annotation['category_id']}, not a COCO class")
        pixels = coco.annToMask(annotation).astype(bool)
        mask[pixels] = CLASS_OF_CATEGORY[annotation["category_id"]] + 1
    return mask


def _write_mask(job: tuple[int, str]) -> bool:
    image_id, target = job
    save_label_png(Path(target), rasterise(image_id))
    return True


def _annotation_inputs(path: Path):
    if path.is_file() and path.suffix == ".json":
        yield path.name, path.read_bytes
        return
    yield from members(check_input(path, "the COCO annotations (--annotations)"),
                       ANNOTATION_MEMBERS)


def prepare_coco(args: argparse.Namespace) -> Report:
    global _COCO
    out = Path(args.out).expanduser() / "COCO2014"
    inputs = [check_input(p, "a COCO image download (--images)") for p in args.images]
    annotation_path = Path(args.annotations).expanduser()
    if not annotation_path.exists():
        raise DataError(f"the COCO annotations (--annotations) not found: {annotation_path} "
                        "does not exist")

    copied = 0
    for source in inputs:
        for name, read in tqdm(members(source, IMAGE_MEMBERS), desc=f"images {source.name}",
                               unit="img", mininterval=1.0):
            image_set, file_name = Path(name).parent.name, Path(name).name
            target = out / image_set / file_name
            if not target.is_file() or target.stat().st_size == 0:
                save_bytes(target, read())
                copied += 1

    report = Report(f"COCO-20i written to {out}")
    found_sets = []
    for name, read in _annotation_inputs(annotation_path):
        image_set = "train2014" if "train2014" in Path(name).name else "val2014"
        found_sets.append(image_set)
        coco = load_instances(read(), name)
        target_dir = out / "annotations" / image_set
        jobs = [(image_id, str(target_dir / Path(info["file_name"]).with_suffix(".png")))
                for image_id, info in sorted(coco.imgs.items())]
        todo = [job for job in jobs if not Path(job[1]).is_file()]
        _COCO = coco
        try:
            progress = tqdm(total=len(todo), desc=f"masks {image_set}", unit="mask",
                            mininterval=1.0)
            if args.workers > 1 and len(todo) > 100:
                with get_context("fork").Pool(args.workers) as pool:
                    for _ in pool.imap_unordered(_write_mask, todo, chunksize=64):
                        progress.update()
            else:
                for job in todo:
                    _write_mask(job)
                    progress.update()
            progress.close()
        finally:
            _COCO = None
        missing = [info["file_name"] for info in coco.imgs.values()
                   if not (out / image_set / info["file_name"]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} images of {name} are not in the --images inputs "
                            f"(first: {image_set}/{missing[0]}); give the {image_set} download")
        report.count(f"{image_set} images in the JSON", len(jobs), IMAGE_COUNTS[image_set])
        report.count(f"{image_set} masks", sum(1 for _ in target_dir.glob("*.png")),
                     IMAGE_COUNTS[image_set])
        report.count(f"{image_set} masks written now", len(todo))
    if not found_sets:
        raise DataError(f"no instances_train2014.json / instances_val2014.json in "
                        f"{annotation_path}; expected annotations_trainval2014.zip")
    for image_set in IMAGE_SETS:
        folder = out / image_set
        count = sum(1 for _ in folder.glob("*.jpg")) if folder.is_dir() else 0
        report.count(f"{image_set} images", count, IMAGE_COUNTS[image_set])
    report.count("images copied now", copied)
    if not args.no_list_check:
        check_lists(args, out, report)
    if args.base_annotations:
        from fss.data.coco import CocoSource

        source = CocoSource(Path(args.out).expanduser(), protocol="pfenet",
                            fold_scheme=args.fold_scheme, lists=list_store(args))
        write_base_label_maps(source, "coco", Path(args.out).expanduser(), report)
    return report


def check_lists(args: argparse.Namespace, folder: Path, report: Report) -> None:
    """Count the images of HSNet's COCO lists present (image and mask) under ``folder``."""
    from fss.data.lists import hsnet_coco_classwise

    store = list_store(args)
    for split in ("trn", "val"):
        for fold in range(4):
            try:
                classwise = hsnet_coco_classwise(store, split, fold)
            except DataError as error:
                report.note(f"official list check skipped: {error}")
                return
            images = {image for names in classwise.values() for image in names}
            present = sum((folder / i).is_file()
                          and (folder / "annotations" / Path(i).with_suffix(".png")).is_file()
                          for i in images)
            report.count(f"HSNet {split} fold {fold} images present", present, len(images))
