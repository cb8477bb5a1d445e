"""``fss-slurm --dry-run``: the sbatch script of a SLURM sweep, rendered by submitit, unsent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "fss.slurm", "--dry-run", *overrides,
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_prints_the_sbatch_script_of_a_two_node_ddp_sweep(tmp_path):
    done = _dry_run(tmp_path, "hydra.launcher.partition=a100", "hydra.launcher.nodes=2",
                    "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
                    "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "fold=0,1",
                    "shot=5")
    assert done.returncode == 0, done.stderr[-2000:]
    script = done.stdout
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=a100", "#SBATCH --array=0-1%2", "#SBATCH --job-name=run",
                 "#SBATCH --time=60"):
        assert line in script.splitlines(), line
    folder = tmp_path / "sweep" / ".submitit"
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun.startswith(f"srun --unbuffered --output {folder}/%A_%a/%A_%a_%t_log.out")
    assert srun.endswith(f"{sys.executable} -u -m submitit.core._submit {folder}/%j")
    jobs = [line for line in script.splitlines() if line.startswith("#   ")]
    assert len(jobs) == 2
    assert " fold=0 shot=5 " in jobs[0] and " fold=1 shot=5 " in jobs[1]


@pytest.mark.parametrize(("override", "message"), [
    ("hydra.launcher.nodes=two", "error: Error merging override hydra.launcher.nodes=two: "
                                 "Value 'two' of type 'str' could not be converted to Integer"),
    ("trainer=ddp", "error: trainer.devices=4 trainer.num_nodes=1 do not match "
                    "hydra.launcher.tasks_per_node=1 hydra.launcher.nodes=1"),
])
def test_a_bad_value_exits_2_with_one_line(tmp_path, override, message):
    done = _dry_run(tmp_path, override)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(message)
