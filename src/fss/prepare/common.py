"""What every preparation shares: the count report and the run's list store.

(Kept out of ``fss.prepare``'s ``__init__``, which imports the preparations that use them.)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    """Counts a preparation produced, each with the official count when one is known."""

    title: str
    rows: list[tuple[str, object, object | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, what: str, value: object, expected: object | None = None) -> None:
        self.rows.append((what, value, expected))

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def mismatches(self) -> list[str]:
        return [what for what, value, expected in self.rows
                if expected is not None and value != expected]

    def render(self) -> str:
        width = max((len(what) for what, _, _ in self.rows), default=10)
        lines = [self.title]
        for what, value, expected in self.rows:
            if expected is None:
                status = ""
            elif value == expected:
                status = "  ok"
            else:
                status = f"  DIFFERS from the official {expected}"
            lines.append(f"  {what:<{width}}  {value}{status}")
        lines.extend(f"  note: {text}" for text in self.notes)
        if self.mismatches:
            lines.append("  Some counts differ from the official ones: expected with a partial "
                         "or tiny input; with the full downloads, check them.")
        return "\n".join(lines)


def list_store(args: argparse.Namespace):
    """The run's one ListStore (``--lists-dir``, ``--cache-dir``, ``--no-verify-lists``)."""
    from fss.data.lists import ListStore

    if getattr(args, "_list_store", None) is None:
        args._list_store = ListStore(args.lists_dir, Path(args.cache_dir) / "lists",
                                     verify=not args.no_verify_lists)
    return args._list_store
