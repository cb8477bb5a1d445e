"""Sweep reports: every job's metrics.json of a multirun directory as a paper-style table
(Markdown, CSV, terminal), with the jobs that failed or never ran.

    fss-report logs/multiruns/2025-01-01_12-00-00    # or python -m fss.report
"""

from fss.report.cli import main, write_report
from fss.report.issues import sweep_issues
from fss.report.jobs import Job, Sweep, collect
from fss.report.table import Row, build_rows

__all__ = ["Job", "Row", "Sweep", "build_rows", "collect", "main", "sweep_issues", "write_report"]
