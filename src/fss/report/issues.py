"""What a sweep report must say besides the numbers: failed, unfinished and missing jobs,
regressions, rows with folds lacking, folds run more than once."""

from __future__ import annotations

from fss.report.jobs import Job, Sweep
from fss.report.table import Row


def sweep_issues(sweep: Sweep, rows: list[Row]) -> dict[str, list[str]]:
    """Section title -> lines (Markdown); sections without lines are left out."""
    jobs = sweep.jobs
    sections = {
        "Failed jobs": [f"`{j.name}` ({_describe(j)}): {j.error or 'no error recorded'}"
                        for j in jobs if j.status == "failed"],
        "Regressions": [f"`{j.name}` ({_describe(j)}): {_regression(j)}"
                        for j in jobs if j.status == "regression"],
        "Jobs without metrics.json": [
            f"`{j.name}` ({_describe(j)}): still running, or killed before it finished "
            "(see its run.log)" for j in jobs if j.status == "no result"],
        "Jobs never started": _never_started(sweep),
        "Incomplete rows": [line for row in rows if (line := _incomplete(row))],
        "Folds run more than once": [
            f"{row.label}: `{j.name}` (fold {j.identity.get('fold')}) is not in the table"
            for row in rows for j in row.unshown],
    }
    return {title: lines for title, lines in sections.items() if lines}


def _describe(job: Job) -> str:
    identity = job.identity
    return (f"{identity.get('model')} {identity.get('backbone')} fold {identity.get('fold')} "
            f"{identity.get('shot')}-shot seed {identity.get('seed')}")


def _regression(job: Job) -> str:
    verify = (job.metrics or {}).get("verify") or {}
    return (f"mIoU {job.metrics.get('mIoU')} is outside the expected "
            f"{verify.get('expected_mIoU')} ± {verify.get('tolerance')}")


def _never_started(sweep: Sweep) -> list[str]:
    """The swept values of each job of multirun.yaml that has no directory."""
    if not sweep.missing:
        return []
    parsed = [dict(o.partition("=")[::2] for o in overrides) for overrides in sweep.expected]
    keys = sorted({k for p in parsed for k in p})
    swept = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    lines = []
    for overrides in sweep.missing:
        values = dict(o.partition("=")[::2] for o in overrides)
        described = " ".join(f"{k}={values[k]}" for k in swept if k in values)
        lines.append(f"{described or ' '.join(overrides)}: no job directory (the sweep "
                     "stopped before it, or its launcher lost it)")
    return lines


def _incomplete(row: Row) -> str:
    lacking = [f for f in row.expected_folds if f not in row.scored_folds]
    if not lacking:
        return ""
    reasons = []
    for fold in lacking:
        job = row.jobs.get(fold)
        reasons.append(f"fold {fold} {'not run' if job is None else job.status}")
    scored = row.scored_folds
    mean = (f"mean over fold{'s' if len(scored) > 1 else ''} {', '.join(map(str, scored))}"
            if scored else "no mean")
    return f"{row.label}: {'; '.join(reasons)}; {mean}"
