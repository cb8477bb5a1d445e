"""A sweep report as cells, then as Markdown, CSV and a terminal table."""

from __future__ import annotations

import csv
import io

from fss.report.jobs import Sweep
from fss.report.table import FOLDS, Row

COLUMNS = ("model", "data", "backbone", "shot", "variant",
           *(f"fold{f}" for f in FOLDS), "folds", "mean", "FB-IoU", "paper", "Δ", "paper FB-IoU",
           "seeds", "± 95 % (seeds)", "best of N seeds", "protocol")
NOT_RUN = "—"  # Markdown / terminal cell of a fold that has no job (empty in the CSV)


def row_cells(row: Row) -> dict[str, str]:
    """The row as text, one entry per column of :data:`COLUMNS`."""
    cells = {"model": row.model, "data": row.data, "backbone": row.backbone,
             "shot": str(row.shot), "variant": row.variant}
    for fold in FOLDS:
        job = row.jobs.get(fold)
        if job is None:
            cells[f"fold{fold}"] = NOT_RUN
        elif job.has_score:
            cells[f"fold{fold}"] = _number(row.fold_miou(fold))
        else:
            cells[f"fold{fold}"] = job.status
    expected = row.expected_folds
    cells["folds"] = f"{len(set(row.scored_folds) & set(expected))}/{len(expected)}"
    cells["mean"] = _number(row.mean)
    cells["FB-IoU"] = _number(row.fbiou)
    cells["paper"] = _number(row.paper_miou)
    cells["Δ"] = "" if row.delta is None else f"{row.delta:+.2f}"
    cells["paper FB-IoU"] = _number(row.paper_fbiou)
    count = row.seed_count
    cells["seeds"] = "" if count is None else str(count)
    cells["± 95 % (seeds)"] = _number(row.mean_ci95)
    best = row.best_of_n
    cells["best of N seeds"] = "" if best is None else f"{best:.2f} (best of {count})"
    cells["protocol"] = row.protocol_label
    return cells


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = row_cells(row)
        writer.writerow({k: "" if v == NOT_RUN else v for k, v in cells.items()})
    return buffer.getvalue()


def to_markdown(sweep: Sweep, rows: list[Row], issues: dict[str, list[str]]) -> str:
    lines = ["# Sweep report", "", f"Directory: `{sweep.directory}`", "", summary(sweep), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c in ("model", "data", "backbone", "variant") else "--:"
                                for c in COLUMNS) + "|")
    for row in rows:
        cells = row_cells(row)
        lines.append("| " + " | ".join(cells[c].replace("|", "\\|") for c in COLUMNS) + " |")
    lines += ["", *legend(rows)]
    for title, entries in issues.items():
        lines += ["", f"## {title}", "", *(f"- {entry}" for entry in entries)]
    return "\n".join(lines) + "\n"


def summary(sweep: Sweep) -> str:
    counts: dict[str, int] = {}
    for job in sweep.jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    parts = [f"{n} {status}" for status, n in counts.items()]
    text = f"{len(sweep.jobs)} job director{'y' if len(sweep.jobs) == 1 else 'ies'}"
    text += f" ({', '.join(parts)})" if parts else ""
    if sweep.expected is not None:
        text += (f"; the sweep launches {len(sweep.expected)} jobs, "
                 f"{len(sweep.missing)} never started")
    return text + "."


def legend(rows: list[Row]) -> list[str]:
    sources = []
    for row in rows:
        paper = row.paper or {}
        source = f"{paper.get('source', 'unnamed source')} ({paper.get('metric', 'mIoU')})"
        if row.paper and source not in sources:
            sources.append(source)
    lines = ["Fold cells: test mIoU; `failed`: the job raised (see below); `no result`: no "
             "metrics.json yet; `—`: not run. `mean` and `FB-IoU`: over the folds scored "
             "(`folds`: scored / reported by the paper)."]
    lines.append("`seeds`: test seeds per fold (`test_seeds`); then `mean` is the mean over "
                 "seeds, `± 95 % (seeds)` the half-width of its 95 % Student-t interval over "
                 "seeds, and `best of N seeds` the mean over folds of each fold's best seed: "
                 "a maximum over N draws of the test episodes, not comparable with a "
                 "one-seed number. `protocol`: name, input size, where predictions are scored, "
                 "boundary label, episode stream (docs/protocols.md).")
    protocols: dict[str, dict] = {}
    for row in rows:
        if row.protocol is not None:
            protocols.setdefault(row.protocol_label, row.protocol)
    for label, record in protocols.items():
        settings = ", ".join(f"{k}={v}" for k, v in record.items())
        lines.append(f"Protocol `{label}`: {settings}.")
    if sources:
        lines.append(f"Paper numbers: {'; '.join(sources)}. With fewer folds scored, `paper` is "
                     "the mean of the paper's per-fold numbers over the same folds; `Δ` = mean − "
                     "paper.")
    else:
        lines.append("No job records the paper's numbers (an experiment file's `paper:` block).")
    return lines


def print_table(sweep: Sweep, rows: list[Row], issues: dict[str, list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect
        console = Console(width=200)
    table = Table(title=f"Sweep report: {sweep.directory}", caption=summary(sweep))
    shown = [c for c in COLUMNS if c != "variant" or any(r.variant for r in rows)]
    for column in shown:
        table.add_column(column, justify="left" if column in ("model", "data", "backbone",
                                                              "variant") else "right")
    for row in rows:
        cells = row_cells(row)
        table.add_row(*(cells[c] for c in shown))
    console.print(table)
    for title, entries in issues.items():
        console.print(f"[bold]{title}[/bold]")
        for entry in entries:
            console.print(f"  - {entry}", markup=False, highlight=False)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
