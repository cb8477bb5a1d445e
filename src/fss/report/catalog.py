"""The catalogue of paper tables: every ``experiments/*.yaml`` with its command and targets.

    python -m fss.report.catalog            # Markdown table on stdout (docs/experiments.md)

Reads each file's ``paper:`` block (source and targets) and the first ``python run.py``
command of its header comment, so the documented list cannot drift from the files:
``tests/test_experiments.py`` checks that docs/experiments.md holds this table verbatim.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"
NO_NUMBERS = "no printed numbers (see the file)"
_COMMAND = re.compile(r"^#\s+(python run\.py .*?)(?:\s+#.*)?$")


@dataclass(frozen=True)
class Entry:
    name: str
    source: str
    command: str
    targets: str


def _is_scores(node: Any) -> bool:
    """{fold|mean|fbiou: number}: one row of a table."""
    return isinstance(node, dict) and bool(node) and all(
        isinstance(value, int | float) for value in node.values())


def _shot_means(by_shot: dict[Any, Any]) -> str:
    parts = []
    for shot, scores in by_shot.items():
        if _is_scores(scores) and "mean" in scores:
            parts.append(f"{shot}-shot {scores['mean']:.1f}")
    return ", ".join(parts)


def summarize_targets(targets: dict[Any, Any] | None, by: dict[str, Any] | None = None) -> str:
    """Compact text of a ``paper.targets`` block: the mean per shot, per swept value. With
    ``by`` (the settings the targets are keyed by before the shot, see
    ``fss.report.table.shot_targets``), each group is labelled by its settings
    (``data.name`` by its value alone, others as ``name=value``)."""
    if not targets:
        return NO_NUMBERS
    if by:
        parts = []
        for labels, by_shot in _by_groups(targets, list(by)):
            means = _shot_means(by_shot) if isinstance(by_shot, dict) else ""
            if means:
                parts.append(f"{' '.join(labels)}: {means}")
        return "; ".join(parts) or NO_NUMBERS
    if all(_is_scores(value) for value in targets.values()):
        return _shot_means(targets) or "per-fold only (see the file)"
    parts = []
    for value, node in targets.items():
        if not isinstance(node, dict):
            continue
        nested = summarize_targets(node) if not all(_is_scores(v) for v in node.values()) \
            else _shot_means(node)
        if nested:
            parts.append(f"{value}: {nested}")
    return "; ".join(parts) or NO_NUMBERS


def _by_groups(node: Any, settings: list[str], labels: tuple[str, ...] = ()):
    """(labels, {shot: scores}) for every combination of the ``by`` settings' values."""
    if not settings:
        yield labels, node
        return
    if not isinstance(node, dict):
        return
    setting, rest = settings[0], settings[1:]
    for value, child in node.items():
        text = _value_text(value)
        label = text if setting == "data.name" else f"{setting.rsplit('.', 1)[-1]}={text}"
        yield from _by_groups(child, rest, (*labels, label))


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _command(text: str, name: str) -> str:
    for line in text.splitlines():
        match = _COMMAND.match(line.strip())
        if match and f"experiment={name}" in match.group(1):
            return match.group(1).strip()
    return f"python run.py experiment={name}"


def read_entries(directory: Path = EXPERIMENTS) -> list[Entry]:
    """One entry per experiment file that states a paper target, sorted by name."""
    entries = []
    for path in sorted(Path(directory).glob("*.yaml")):
        text = path.read_text()
        paper = (yaml.safe_load(text) or {}).get("paper")
        if not paper:
            continue
        entries.append(Entry(name=path.stem, source=str(paper.get("source", "")),
                             command=_command(text, path.stem),
                             targets=summarize_targets(paper.get("targets"), paper.get("by"))))
    return entries


def to_markdown(entries: list[Entry]) -> str:
    lines = ["| experiment | reproduces | command | paper mIoU (mean over folds) |",
             "|---|---|---|---|"]
    lines += [f"| `{e.name}` | {e.source} | `{e.command}` | {e.targets} |" for e in entries]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=EXPERIMENTS, help="experiments directory")
    args = parser.parse_args(argv)
    print(to_markdown(read_entries(args.dir)))


if __name__ == "__main__":
    main()
