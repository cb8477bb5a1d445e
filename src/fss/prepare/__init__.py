"""Turn the raw public downloads into the layout the loaders of ``fss.data`` read.

::

    python -m fss.prepare pascal  --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out DATA
    python -m fss.prepare coco    --images train2014.zip val2014.zip \\
                                  --annotations annotations_trainval2014.zip --out DATA
    python -m fss.prepare fss1000 --zip fewshot_data.zip --out DATA

(also as the ``fss-prepare`` console script). Inputs may be the archives or the folders
they unpack to. Every output file is written atomically and skipped when it exists, so an
interrupted run resumes where it stopped. At the end the command prints the counts it
produced next to the known ones of the official datasets and the official split lists
(a tiny or partial input differs; ``--strict`` turns a difference into exit status 1).
``--base-annotations`` also writes BAM/HDMNet's per-fold base-class label maps.
See docs/datasets.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fss.utils.errors import ConfigError

log = logging.getLogger(__name__)


def _default_out() -> str:
    return os.environ.get("FSS_DATA", str(Path.cwd() / "datasets"))


def _default_cache() -> str:
    return os.environ.get("FSS_CACHE", str(Path.cwd() / ".cache"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fss-prepare",
        description="Build the on-disk layout of PASCAL-5i, COCO-20i or FSS-1000 from the raw "
                    "downloads (resumable; see docs/datasets.md).",
    )
    sub = parser.add_subparsers(dest="dataset", required=True)

    def common(p: argparse.ArgumentParser, lists: bool = True) -> None:
        p.add_argument("--out", default=_default_out(),
                       help="data root to write (default: $FSS_DATA or ./datasets)")
        p.add_argument("--strict", action="store_true",
                       help="exit with status 1 when a count differs from the official one")
        if lists:
            p.add_argument("--lists-dir", default=None,
                           help="folder or URL with the official hsnet/ and pfenet/ lists "
                                "(default: download them, pinned and checksum-verified)")
            p.add_argument("--cache-dir", default=_default_cache(),
                           help="cache for lists and built lists (default: $FSS_CACHE or "
                                "./.cache, as paths.cache_dir)")
            p.add_argument("--no-verify-lists", action="store_true",
                           help="accept lists whose sha256 differs from the official one "
                                "(edited or home-made lists in --lists-dir)")
            p.add_argument("--no-list-check", action="store_true",
                           help="skip counting the official lists' pairs on the result")

    pascal = sub.add_parser("pascal", help="PASCAL VOC2012 + SBD -> VOC2012/SegmentationClassAug")
    pascal.add_argument("--voc", required=True,
                        help="VOCtrainval_11-May-2012.tar or the folder it unpacks to")
    pascal.add_argument("--sbd", required=True,
                        help="SBD benchmark.tgz or its benchmark_RELEASE folder (dataset/cls/*.mat)")
    pascal.add_argument("--base-annotations", action="store_true",
                        help="also write base_annotation/pascal/{train,val}/<fold>/*.png")
    common(pascal)

    coco = sub.add_parser("coco", help="COCO 2014 images + instances JSON -> class-index masks")
    coco.add_argument("--images", nargs="+", required=True,
                      help="train2014.zip val2014.zip (or their folders)")
    coco.add_argument("--annotations", required=True,
                      help="annotations_trainval2014.zip, its folder, or the instances_*.json")
    coco.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="processes rasterising masks")
    coco.add_argument("--base-annotations", action="store_true",
                      help="also write base_annotation/coco/{train,val}/<fold>/*.png")
    coco.add_argument("--fold-scheme", default="interleaved",
                      choices=("interleaved", "contiguous"),
                      help="fold rule of the base annotations")
    common(coco)

    fss = sub.add_parser("fss1000", help="FSS-1000 zip -> FSS-1000/<class>/<n>.jpg|png")
    fss.add_argument("--zip", required=True, help="fewshot_data.zip or the folder it unpacks to")
    common(fss)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns (and exits with) the status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.dataset == "pascal":
            from fss.prepare.pascal import prepare_pascal as prepare
        elif args.dataset == "coco":
            from fss.prepare.coco import prepare_coco as prepare
        else:
            from fss.prepare.fss1000 import prepare_fss1000 as prepare
        report = prepare(args)
    except ConfigError as error:  # DataError included: one actionable line
        print(f"error: {error}", file=sys.stderr)
        status = 2
    else:
        print(report.render())
        status = 1 if args.strict and report.mismatches else 0
    if argv is None:
        sys.exit(status)
    return status
