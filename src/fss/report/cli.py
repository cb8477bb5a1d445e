"""``fss-report <multirun dir> [--out DIR] [--strict]``: prints the sweep's table and writes
``report.md`` and ``report.csv`` (into the multirun directory unless ``--out`` is given)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fss.report.issues import sweep_issues
from fss.report.jobs import Sweep, collect
from fss.report.render import print_table, to_csv, to_markdown
from fss.report.table import Row, build_rows
from fss.utils.errors import ConfigError


@dataclass(frozen=True)
class Report:
    sweep: Sweep
    rows: list[Row]
    issues: dict[str, list[str]]
    markdown: Path
    csv: Path


def write_report(directory: Path, out: Path | None = None) -> Report:
    """Reads ``directory``'s jobs and writes report.md and report.csv into ``out`` (default:
    ``directory``). Raises ConfigError when no job there has a metrics.json."""
    sweep = collect(Path(directory))
    if not any(job.metrics is not None for job in sweep.jobs):
        started = len(sweep.jobs)
        raise ConfigError(
            f"no metrics.json under {directory}"
            + (f" ({started} job director{'y' if started == 1 else 'ies'} without one: "
               "still running, or killed)" if started else "")
            + "; pass a multirun directory such as logs/multiruns/<date_time>")
    rows = build_rows(sweep)
    issues = sweep_issues(sweep, rows)
    out = Path(out) if out is not None else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    markdown, table = out / "report.md", out / "report.csv"
    markdown.write_text(to_markdown(sweep, rows, issues))
    table.write_text(to_csv(rows))
    return Report(sweep, rows, issues, markdown, table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fss-report",
        description="Table of a sweep's results (rows: model/backbone/shot[/variant], "
                    "columns: folds, mean, FB-IoU, paper, Δ) from every job's metrics.json.")
    parser.add_argument("directory", type=Path, help="a multirun directory (or a run's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and report.csv go (default: the directory)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a job failed, regressed, has no result or never ran")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.directory, args.out)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print_table(report.sweep, report.rows, report.issues)
    print(f"Wrote {report.markdown} and {report.csv}")
    problems = {"Failed jobs", "Regressions", "Jobs without metrics.json", "Jobs never started"}
    if args.strict and problems & set(report.issues):
        sys.exit(1)
