"""Tiny stand-ins for the raw downloads, in their official formats, with known contents.

They let the tests (and a curious user) run ``fss.prepare`` and the loaders end to end
without the real data: a VOC2012 tar + an SBD tgz, COCO 2014 image zips + an instances
JSON (polygons, RLE and crowd RLE), an FSS-1000 zip, and split lists in the official
formats for them (``write_*_lists``; they are not the official lists, so a ListStore
reads them with ``verify=False``).

Every object is an axis-aligned rectangle: ``objects[image id]`` lists ``(class, (y0, y1,
x0, x1))`` with 0-based classes, painted in order (later on top).
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fss.data.io import voc_palette

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (exclusive ends)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(label: np.ndarray, palette: list[int] | None = None) -> bytes:
    image = Image.fromarray(label.astype(np.uint8))
    if palette is not None:
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image(rng: np.random.Generator, size: tuple[int, int], objects) -> np.ndarray:
    image = rng.integers(40, 90, size=(*size, 3), dtype=np.uint8)
    for class_id, (y0, y1, x0, x1) in objects:
        colour = np.array([(37 * class_id) % 200 + 40, (91 * class_id) % 200 + 40,
                           (53 * class_id) % 200 + 40], dtype=np.uint8)
        image[y0:y1, x0:x1] = colour
    return image


def paint(size: tuple[int, int], objects, boundary: bool = False) -> np.ndarray:
    """(H, W) uint8 label map: 0 background, class + 1, and (``boundary``) a 1-pixel 255
    band on the inner edge of every rectangle, like VOC's outlines."""
    label = np.zeros(size, dtype=np.uint8)
    for class_id, (y0, y1, x0, x1) in objects:
        label[y0:y1, x0:x1] = class_id + 1
    if boundary:
        for _, (y0, y1, x0, x1) in objects:
            label[y0, x0:x1] = label[y1 - 1, x0:x1] = 255
            label[y0:y1, x0] = label[y0:y1, x1 - 1] = 255
    return label


def _add(archive, name: str, data: bytes) -> None:
    if isinstance(archive, tarfile.TarFile):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    else:
        archive.writestr(name, data)


# ------------------------------------------------------------------------------ PASCAL


@dataclass
class TinyPascal:
    voc_tar: Path
    sbd_tgz: Path
    objects: dict[str, list[tuple[int, Box]]]
    voc_train: list[str]
    voc_val: list[str]
    sbd_train: list[str]
    sbd_val: list[str]
    size: tuple[int, int] = (96, 128)

    @property
    def trainaug(self) -> list[str]:
        return sorted((set(self.sbd_train) | set(self.sbd_val) | set(self.voc_train))
                      - set(self.voc_val))


def make_pascal_raw(folder: Path, per_class: int = 6, seed: int = 0) -> TinyPascal:
    """A VOC2012 tar and an SBD tgz with ``per_class`` images of each of the 20 classes.

    Image ``k`` (id ``2008_00kkkk``) holds class ``k % 20`` as a large rectangle (>= 2048
    pixels); every third image also holds class ``(k + 7) % 20``: small (< 2048 pixels)
    when ``k % 2 == 0``, large otherwise. Half of the images of each class go to the
    training side (SBD train / VOC train), half to VOC val; VOC annotates every other
    training image and every val image (with 255 boundaries), SBD the other training
    images plus a few val images (which VOC's annotation must override).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = (96, 128)
    objects: dict[str, list[tuple[int, Box]]] = {}
    voc_train, voc_val, sbd_train, sbd_val = [], [], [], []
    for k in range(20 * per_class):
        image_id = f"2008_{k:06d}"
        main = k % 20
        items = [(main, (8, 72, 8, 72))]  # 64 x 64 = 4096 pixels
        if k % 3 == 0:
            small = (76, 92, 80, 120) if k % 2 == 0 else (40, 92, 80, 124)  # 640 / 2288 px
            items.append(((k + 7) % 20, small))
        objects[image_id] = items
        on_train_side = (k // 20) % 2 == 0
        if on_train_side:
            (voc_train if k % 2 == 0 else sbd_train).append(image_id)
        else:
            voc_val.append(image_id)
            if k % 4 == 1:
                sbd_val.append(image_id)  # SBD also annotates it: VOC must win
    with tarfile.open(folder / "VOCtrainval_11-May-2012.tar", "w") as tar:
        base = "VOCdevkit/VOC2012"
        palette = voc_palette()
        for image_id, items in objects.items():
            _add(tar, f"{base}/JPEGImages/{image_id}.jpg", _jpeg(_image(rng, size, items)))
            if image_id in voc_train or image_id in voc_val:
                label = paint(size, items, boundary=True)
                _add(tar, f"{base}/SegmentationClass/{image_id}.png", _png(label, palette))
        for name, ids in (("train", voc_train), ("val", voc_val)):
            _add(tar, f"{base}/ImageSets/Segmentation/{name}.txt",
                 "".join(f"{i}\n" for i in ids).encode())
    from scipy.io import savemat

    with tarfile.open(folder / "benchmark.tgz", "w:gz") as tar:
        base = "benchmark_RELEASE/dataset"
        for image_id in sbd_train + sbd_val:
            label = paint(size, objects[image_id])
            buffer = io.BytesIO()
            savemat(buffer, {"GTcls": {"Segmentation": label,
                                       "Boundaries": np.zeros(1),
                                       "CategoriesPresent": np.unique(label[label > 0])}})
            _add(tar, f"{base}/cls/{image_id}.mat", buffer.getvalue())
        for name, ids in (("train", sbd_train), ("val", sbd_val)):
            _add(tar, f"{base}/{name}.txt", "".join(f"{i}\n" for i in ids).encode())
    return TinyPascal(folder / "VOCtrainval_11-May-2012.tar", folder / "benchmark.tgz",
                      objects, voc_train, voc_val, sbd_train, sbd_val, size)


def write_pascal_lists(lists_dir: Path, tiny: TinyPascal) -> None:
    """HSNet-format and PFENet-format lists of the tiny PASCAL tree.

    HSNet ``trn/fold<f>.txt``: ``ID__CC`` of every trainaug image and every class of fold
    ``f`` in it; ``val/fold<f>.txt``: the same over VOC val. PFENet: trainaug / val pairs.
    """
    lists_dir = Path(lists_dir)
    for split, ids in (("trn", tiny.trainaug), ("val", sorted(tiny.voc_val))):
        for fold in range(4):
            lines = [f"{i}__{c + 1:02d}" for i in ids for c, _ in tiny.objects[i]
                     if c // 5 == fold]
            path = lists_dir / "hsnet" / "pascal" / split / f"fold{fold}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{line}\n" for line in lines))
    pfenet = lists_dir / "pfenet" / "pascal"
    pfenet.mkdir(parents=True, exist_ok=True)
    for name, ids in (("voc_sbd_merge_noduplicate.txt", tiny.trainaug),
                      ("val.txt", sorted(tiny.voc_val))):
        (pfenet / name).write_text("".join(
            f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids))


# -------------------------------------------------------------------------------- COCO


@dataclass
class TinyCoco:
    image_zips: list[Path]
    annotation_zip: Path
    # file name -> list of (class, box) for the two image sets
    objects: dict[str, dict[str, list[tuple[int, Box]]]] = field(default_factory=dict)
    size: tuple[int, int] = (64, 80)


def _polygon(box: Box) -> list[float]:
    y0, y1, x0, x1 = box
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def make_coco_raw(folder: Path, per_class: int = 3, seed: int = 0) -> TinyCoco:
    """COCO-2014-like zips: ``per_class`` images per class in each of train2014 / val2014.

    Image ``k`` holds class ``k % 80`` (a 48 x 60 rectangle, >= 2048 pixels): as a polygon,
    or for ``k % 5 == 1`` as compressed RLE, for ``k % 5 == 2`` as an uncompressed crowd
    RLE. Every fourth image also holds class ``(k + 20) % 80`` as a small polygon painted on
    top (smaller area). One image per set has no annotation.
    """
    from pycocotools import mask as mask_utils

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = (64, 80)
    tiny = TinyCoco([], folder / "annotations_trainval2014.zip", {}, size)
    annotations_json = {}
    for image_set in ("train2014", "val2014"):
        images, annotations = [], []
        tiny.objects[image_set] = {}
        zip_path = folder / f"{image_set}.zip"
        tiny.image_zips.append(zip_path)
        with zipfile.ZipFile(zip_path, "w") as archive:
            for k in range(80 * per_class + 1):
                image_id = k + 1 + (0 if image_set == "train2014" else 100000)
                name = f"COCO_{image_set}_{image_id:012d}.jpg"
                items: list[tuple[int, Box]] = []
                if k < 80 * per_class:  # the last image has no annotation
                    items.append((k % 80, (4, 52, 4, 64)))
                    if k % 4 == 0:
                        items.append(((k + 20) % 80, (20, 36, 20, 40)))
                tiny.objects[image_set][name] = items
                _add(archive, f"{image_set}/{name}", _jpeg(_image(rng, size, items)))
                images.append({"id": image_id, "file_name": name, "height": size[0],
                               "width": size[1]})
                for n, (class_id, box) in enumerate(items):
                    y0, y1, x0, x1 = box
                    entry = {"id": image_id * 10 + n, "image_id": image_id,
                             "category_id": CATEGORY_IDS[class_id], "iscrowd": 0,
                             "area": float((y1 - y0) * (x1 - x0)),
                             "bbox": [x0, y0, x1 - x0, y1 - y0]}
                    kind = k % 5 if n == 0 else 0
                    if kind in (1, 2):
                        binary = np.zeros(size, dtype=np.uint8, order="F")
                        binary[y0:y1, x0:x1] = 1
                        if kind == 1:
                            rle = mask_utils.encode(np.asfortranarray(binary))
                            entry["segmentation"] = {"size": list(size),
                                                     "counts": rle["counts"].decode()}
                        else:
                            entry["segmentation"] = {"size": list(size),
                                                     "counts": _uncompressed_rle(binary)}
                            entry["iscrowd"] = 1
                    else:
                        entry["segmentation"] = [_polygon(box)]
                    annotations.append(entry)
        categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"}
                      for c in CATEGORY_IDS]
        annotations_json[image_set] = {"images": images, "annotations": annotations,
                                       "categories": categories}
    with zipfile.ZipFile(tiny.annotation_zip, "w") as archive:
        for image_set, content in annotations_json.items():
            _add(archive, f"annotations/instances_{image_set}.json", json.dumps(content).encode())
    return tiny


def _uncompressed_rle(binary: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = binary.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return [int(c) for c in counts]


# Must match fss.prepare.coco.CATEGORY_IDS (kept here to build JSONs without importing it).
CATEGORY_IDS = tuple(i for i in range(1, 91)
                     if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def write_coco_lists(lists_dir: Path, tiny: TinyCoco) -> None:
    """HSNet-format COCO pickles (interleaved folds): class -> images containing it."""
    for split, image_set in (("trn", "train2014"), ("val", "val2014")):
        for fold in range(4):
            table: dict[int, list[str]] = {c: [] for c in range(80)}
            for name, items in tiny.objects[image_set].items():
                for class_id, _ in items:
                    novel = class_id % 4 == fold
                    if novel == (split == "val") and f"{image_set}/{name}" not in table[class_id]:
                        table[class_id].append(f"{image_set}/{name}")
            path = Path(lists_dir) / "hsnet" / "coco" / split / f"fold{fold}.pkl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(table, protocol=3))


# ---------------------------------------------------------------------------- FSS-1000


def make_fss_raw(folder: Path, classes: Sequence[str], seed: int = 0,
                 size: tuple[int, int] = (32, 32)) -> Path:
    """``fewshot_data.zip`` with 10 images (+ RGB masks, object = white) per class."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = folder / "fewshot_data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for n, name in enumerate(classes):
            for index in range(1, 11):
                box = (4, 4 + 8 + index, 4, 24)
                _add(archive, f"fewshot_data/{name}/{index}.jpg",
                     _jpeg(_image(rng, size, [(n % 50, box)])))
                mask = np.zeros((*size, 3), dtype=np.uint8)
                mask[box[0]:box[1], box[2]:box[3]] = 255
                buffer = io.BytesIO()
                Image.fromarray(mask).save(buffer, format="PNG")
                _add(archive, f"fewshot_data/{name}/{index}.png", buffer.getvalue())
    return path


def write_fss_lists(lists_dir: Path, splits: dict[str, Sequence[str]]) -> None:
    """``hsnet/fss/{trn,val,test}.txt`` with the given class names."""
    for split, names in splits.items():
        path = Path(lists_dir) / "hsnet" / "fss" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{n}\n" for n in names))
