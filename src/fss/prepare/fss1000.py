"""FSS-1000 zip -> ``FSS-1000/<class>/<n>.jpg|png``.

The official archive (``fewshot_data.zip``) holds ``fewshot_data/<class>/<n>.jpg`` and the
mask ``<n>.png`` of each image (n = 1..10). Files are copied as they are (the loader
thresholds masks at 128); the class folder is the file's parent folder.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tqdm import tqdm

from fss.data.io import save_bytes
from fss.prepare.common import Report, list_store
from fss.prepare.inputs import check_input, members
from fss.utils.errors import DataError

MEMBERS = re.compile(r"(?:^|/)(?!__MACOSX/)[^/]+/[^/]+\.(?:jpg|png)$")
CLASS_COUNT = 1000
SPLIT_SIZES = {"trn": 520, "val": 240, "test": 240}


def prepare_fss1000(args: argparse.Namespace) -> Report:
    source = check_input(args.zip, "the FSS-1000 download (--zip)")
    out = Path(args.out).expanduser() / "FSS-1000"
    copied = 0
    for name, read in tqdm(members(source, MEMBERS), desc="FSS-1000", unit="file",
                           mininterval=1.0):
        path = Path(name)
        if "__MACOSX" in path.parts or path.name.startswith("."):
            continue
        target = out / path.parent.name / path.name
        if not target.is_file() or target.stat().st_size == 0:
            save_bytes(target, read())
            copied += 1
    if not out.is_dir():
        raise DataError(f"no <class>/<n>.jpg files in {source}; expected FSS-1000's "
                        "fewshot_data.zip")

    classes = sorted(p for p in out.iterdir() if p.is_dir())
    images = {c.name: sorted(p.stem for p in c.glob("*.jpg")) for c in classes}
    masks = {c.name: sorted(p.stem for p in c.glob("*.png")) for c in classes}
    unpaired = [f"{c}/{n}" for c in images
                for n in sorted(set(images[c]) ^ set(masks[c]))]
    report = Report(f"FSS-1000 written to {out}")
    report.count("class folders", len(classes), CLASS_COUNT)
    report.count("images", sum(len(v) for v in images.values()), CLASS_COUNT * 10)
    report.count("masks", sum(len(v) for v in masks.values()), CLASS_COUNT * 10)
    report.count("files copied now", copied)
    if unpaired:
        report.note(f"{len(unpaired)} images without a mask or masks without an image, e.g. "
                    f"{unpaired[0]} (the loader will refuse them)")
    if not args.no_list_check:
        from fss.data.lists import fss_classes

        try:
            for split, size in SPLIT_SIZES.items():
                names = fss_classes(list_store(args), split)
                present = sum((out / n).is_dir() for n in names)
                report.count(f"HSNet {split} classes present", present, size)
        except DataError as error:
            report.note(f"official list check skipped: {error}")
    return report
