"""The import structure of src/fss: every module imports on its own, no import cycle, the
dependency direction of docs/architecture.md ("What may import what"), and a light
``import fss.models``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "fss"

# Entry-point modules: importing one runs its command (they only call their package's
# main, which is imported and checked like every module).
ENTRY_POINTS = {"fss.prepare.__main__", "fss.report.__main__"}

# ------------------------------------------------------------ what may import what
# Layers, lowest first: a module may import modules of its own layer and of the layers
# below it, never above. The longest matching prefix places a module. The same table is in
# docs/architecture.md.
LAYERS: dict[str, int] = {
    "fss.utils": 0,            # may be imported by all
    "fss.version": 0,
    "fss.ops": 1,              # kernels: torch only
    "fss.models": 2,           # plain nn.Modules, their official key tables, checkpoint io
    "fss.data": 3,             # datasets, episodes, DataModules
    "fss.metrics": 3,          # torchmetrics Metrics (+ the prototype calibration score)
    "fss.lightning": 4,        # LightningModules, callbacks
    "fss.stages": 4,           # cached training stages
    "fss.checkpoints": 4,      # run description of Lightning checkpoints, fss.load_model
    "fss.resume": 4,
    "fss.pipeline": 5,         # one job: stages, fit, test, metrics.json
    "fss.cli": 6,              # commands
    "fss.slurm": 6,
    "fss.prepare": 6,
    "fss.report": 6,
    "fss": 6,                  # the package root (fss.load_model, lazily)
}
LAYER_NAMES = ["utils", "ops", "models", "data/metrics", "lightning/stages", "pipeline", "cli"]
# (importer, imported): allowed against the direction, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def all_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fss modules ``module`` imports, at module level or inside functions: for
    ``from a.b import c``, ``a.b.c`` if it is a module, else ``a.b``."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "fss":
                continue
            while target not in modules:  # `import fss.models.x.attr` style: the module
                target = target.rsplit(".", 1)[0]
            if target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A closed path a -> b -> ... -> a through the component (shortest from its first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    return [*paths[node], start]
                if successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {sorted(component)}")


def layer_of(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py "
                             "and to docs/architecture.md")
    return LAYERS[max(matches, key=len)]


# ---------------------------------------------------------------------------- tests
def test_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "fss.models.checkpoint_io" in graph["fss.models.backbones"]  # module level
    assert "fss.checkpoints" in graph["fss"]  # inside the root's __getattr__
    # The check itself finds a cycle and prints it as a path.
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in src/fss:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_dependency_direction():
    wrong = []
    for module, imported in sorted(import_graph().items()):
        for target in sorted(imported):
            if layer_of(target) > layer_of(module) and (module, target) not in EXCEPTIONS:
                wrong.append(f"{module} ({LAYER_NAMES[layer_of(module)]}) imports {target} "
                             f"({LAYER_NAMES[layer_of(target)]})")
    assert not wrong, "imports against the direction ops <- models <- data/metrics <- " \
        "lightning/stages <- pipeline <- cli:\n" + "\n".join(wrong)
    graph = import_graph()
    unused = [pair for pair in EXCEPTIONS if pair[1] not in graph.get(pair[0], set())]
    assert not unused, f"exceptions no longer needed (remove them): {unused}"


# Runs in a fresh interpreter: imports each module given with every fss module removed
# from sys.modules first (third-party packages stay loaded: they are not what is tested),
# so each import starts from nothing of fss, in no particular order.
_ISOLATED = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "fss" or m.startswith("fss.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def _run_isolated(names: list[str]) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _ISOLATED, json.dumps(names)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_module_imports_on_its_own():
    names = [m for m in all_modules() if m not in ENTRY_POINTS]
    assert len(names) > 50
    batches = [names[i::2] for i in range(2)]  # two interpreters side by side
    with ThreadPoolExecutor(len(batches)) as pool:
        failures = {k: v for result in pool.map(_run_isolated, batches) for k, v in result.items()}
    assert not failures, "\n".join(f"{name}:\n{error}" for name, error in failures.items())


HEAVY = ("lightning", "pytorch_lightning", "hydra", "fss.data", "fss.lightning", "fss.metrics")


@pytest.mark.parametrize("module", ["fss.models", "fss"])
def test_models_import_without_lightning_hydra_or_data(module):
    code = (f"import sys, {module}; import json; "
            f"print(json.dumps(sorted(m for m in sys.modules if m in {HEAVY!r})))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
