"""``fss-slurm --dry-run [overrides]``: the sbatch script a SLURM sweep would submit, unsent.

The overrides are those of ``python run.py -m ...``. The real config is composed with them
(``hydra/launcher=submitit_slurm`` added unless they choose a launcher or ``local=``), every
job of the sweep is composed and checked, and the script is rendered by submitit's own
``_make_sbatch_string`` from the launcher's parameters mapped as hydra-submitit-launcher maps
them. submitit pickles each job, so the ``srun`` line runs ``submitit.core._submit``; the
overrides of each job are listed under the script as comments. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from fss.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = "hydra/launcher=submitit_slurm"


def _conf_dir() -> Path:
    for root in (ROOT, Path.cwd()):
        if (root / "conf" / "config.yaml").is_file():
            return root / "conf"
    raise ConfigError("conf/config.yaml not found: run fss-slurm from the fss repository root")


def _check_launcher_installed() -> None:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        import submitit  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"the SLURM launcher is not installed ({error.name} missing): "
                          "pip install -e '.[slurm]'") from error


def job_overrides(overrides: list[str]) -> list[list[str]]:
    """The jobs of ``run.py -m <overrides>``: one list of overrides per job, in Hydra's order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for job in jobs]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3", job_name="run"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _launcher_params(cfg) -> dict[str, Any]:
    """``hydra.launcher`` as SlurmLauncher receives it (resolved, without ``_target_``)."""
    from omegaconf import OmegaConf

    launcher = cfg.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if not target.endswith("submitit_launcher.SlurmLauncher"):
        raise ConfigError(f"hydra.launcher is {target or 'not set'}, not the SLURM launcher: "
                          f"add {LAUNCHER} or local=slurm")
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_", None)
    return params


def _check_ddp_layout(cfg, params: dict[str, Any]) -> None:
    """Lightning under SLURM wants one task per device and the same node count."""
    devices, num_nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1) or 1
    tasks, nodes = params.get("tasks_per_node", 1), params.get("nodes", 1)
    if isinstance(devices, int) and (devices, num_nodes) != (tasks, nodes):
        raise ConfigError(
            f"trainer.devices={devices} trainer.num_nodes={num_nodes} do not match "
            f"hydra.launcher.tasks_per_node={tasks} hydra.launcher.nodes={nodes}: SLURM starts "
            "one task per device, so set them equal (docs/slurm.md)")


def sbatch_script(params: dict[str, Any], num_jobs: int) -> str:
    """The sbatch text of SlurmLauncher.launch with these parameters, for ``num_jobs`` jobs."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.auto.auto import AutoExecutor
    from submitit.slurm import slurm

    # hydra-submitit-launcher: submitit_folder (and max_num_timeout) configure the executor;
    # BaseQueueConf's keys are AutoExecutor's generic parameters, the others are "slurm_<key>".
    init_keys = {"submitit_folder", "max_num_timeout"}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    launcher = {k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys}
    # AutoExecutor: None is "not set"; generic keys become SLURM names (timeout_min -> time,
    # mem_gb -> mem, tasks_per_node -> ntasks_per_node ...), "slurm_<key>" become <key>.
    launcher = {k: v for k, v in launcher.items() if v is not None}
    generics = set(AutoExecutor._typed_parameters())
    executor = slurm.SlurmExecutor.__new__(slurm.SlurmExecutor)  # __init__ looks for srun
    parameters = executor._convert_parameters({k: v for k, v in launcher.items() if k in generics})
    for key, value in launcher.items():
        if key not in generics:
            parameters[key.removeprefix("slurm_")] = value
    unknown = sorted(set(parameters) - set(slurm._get_default_parameters()))
    if unknown:
        raise ConfigError(f"hydra.launcher has parameters sbatch does not take: {', '.join(unknown)}")
    if num_jobs > 1:  # SlurmExecutor submits a sweep as one array
        parameters["map_count"] = num_jobs
    folder = Path(str(params["submitit_folder"]))
    python = shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    try:
        return slurm._make_sbatch_string(command=command, folder=folder, **parameters)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"hydra.launcher: {error}") from error


def dry_run(overrides: list[str]) -> str:
    """The script and the job list that ``python run.py -m <overrides>`` would submit."""
    _check_launcher_installed()
    os.environ.setdefault("PROJECT_ROOT", str(_conf_dir().parent))
    if not any(o.startswith(("hydra/launcher=", "local=")) for o in overrides):
        overrides = [LAUNCHER, *overrides]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fss.pipeline import validate

    try:
        jobs = job_overrides(overrides)
        configs = [_compose(job) for job in jobs]
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__
        detail = f"{error}: {str(cause).splitlines()[0]}" if cause is not None else str(error)
        raise ConfigError(" ".join(detail.split())) from error
    params = _launcher_params(configs[0])
    for cfg in configs:
        validate(cfg, this_machine=False)  # the jobs run on the cluster's nodes
        _check_ddp_layout(cfg, params)
    lines = [sbatch_script(params, len(jobs)).rstrip("\n"), "",
             f"# {len(jobs)} job(s); each runs run.py's task with these overrides:"]
    lines += [f"#   {i}: {' '.join(job)}" for i, job in enumerate(jobs)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fss-slurm",
        description="Print the sbatch script that `python run.py -m <overrides>` would submit "
                    "to SLURM, without submitting (docs/slurm.md).")
    parser.add_argument("--dry-run", action="store_true", required=True,
                        help="print the script and the jobs; nothing is submitted")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py -m")
    args = parser.parse_args(argv)
    try:
        print(dry_run(args.overrides), end="")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
