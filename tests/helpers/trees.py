"""Tiny dataset trees in the real layouts, prepared as a user prepares the real ones."""

from __future__ import annotations

from pathlib import Path

from fss.prepare import main, tiny


def prepared_pascal_tree(folder: Path) -> Path:
    """A tiny VOC + SBD download under ``folder/raw``, its split lists under
    ``folder/lists``, and ``fss-prepare pascal`` run on it into ``folder/data``."""
    raw = tiny.make_pascal_raw(folder / "raw")
    tiny.write_pascal_lists(folder / "lists", raw)
    assert main(["pascal", "--voc", str(raw.voc_tar), "--sbd", str(raw.sbd_tgz), "--out",
                 str(folder / "data"), "--no-list-check"]) == 0
    return folder
