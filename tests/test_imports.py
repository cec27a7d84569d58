"""The floor rule (docs/architecture.md): every nas module imports only from floors below its own, or
from its own package; no import cycle between modules. Lazy imports (inside functions) and
TYPE_CHECKING imports count: an arrow is an arrow.

`python tests/test_imports.py` prints the counts (upward imports, cycles) and every offender.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nas"

# unit -> floor, bottom to top. A unit is a package of nas/ (or a top-level module).
FLOORS: dict[str, int] = {
    "nas.core": 1,  # errors, limits, strict YAML, settings models, run folders
    "nas.models": 2,  # the shipped U-Net classes; find and load a saved U-Net
    "nas.deploy": 3,  # runtimes, their choices table, ONNX export of a module
    "nas.diffusion": 3,  # the recipe: schedule, targets, loss weights
    "nas.space": 4,  # architecture and space schemas (distill settings included), sampling, build
    "nas.cost": 5,  # counts, measured latency, latency blocks and tables
    "nas.data": 6,  # datasets, encoders, latent cache
    "nas.teacher": 6,  # a teacher's architecture, inheritance plan and copy
    "nas.train": 7,  # config and presets, the loop, distillation, checkpoints
    "nas.sample": 8,  # run components, generation, pipeline and ONNX folder export
    "nas.search": 9,  # the only Optuna/Ray layer: storage, engines, objective, proxies, export
    "nas.evaluate": 9,  # quality against steps, the shapes evaluator, the A/B page
    "nas.commands": 10,  # one thin module per command
    "nas.pipeline": 11,  # `nas run`: plan, runner, variants, comparison, the run command
    "nas.cli": 12,
    "nas.__main__": 13,  # `python -m nas`: the CLI
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """nas modules that `path` imports anywhere in its body (`from P import m` counts P.m if m is a module)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nas")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.split(".")[0] != "nas":
                continue
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                found.add(sub if exists(sub) else name)
    return found


def exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str | None:
    for unit in sorted(FLOORS, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """'a -> b (floor x -> y)' for each import of a unit not strictly below the importer's (its own excepted)."""
    bad = []
    for mod, targets in edges.items():
        unit = unit_of(mod)
        for target in sorted(targets):
            other = unit_of(target)
            if target == "nas" or unit == other or other is None or unit is None:
                continue
            if FLOORS[other] >= FLOORS[unit]:
                bad.append(f"{mod} -> {target} (floor {FLOORS[unit]} -> {FLOORS[other]})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of two or more modules (Tarjan). A package's __init__ re-exporting its
    own modules is not an arrow back: `from nas.x import y` inside nas.x.* names y's module directly."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    assert [m for m in graph() if m != "nas" and unit_of(m) is None] == []


def test_no_import_points_up():
    assert upward_imports(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checker_sees_an_upward_import_and_a_cycle():
    edges = {"nas.core.errors": {"nas.train.loop"}, "nas.train.loop": {"nas.core.errors"}}
    assert upward_imports(edges) == ["nas.core.errors -> nas.train.loop (floor 1 -> 7)"]
    assert cycles(edges) == [["nas.core.errors", "nas.train.loop"]]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("nas.space.schema", ("diffusers", "torch", "nas.train")),  # a schema is data
        ("nas.core.settings", ("diffusers", "torch")),
        ("nas.search.settings", ("diffusers", "torch", "optuna", "ray")),
    ],
)
def test_light_modules_load_no_heavy_code(module, forbidden):
    code = (
        f"import sys, {module}; "
        f"print(' '.join(m for m in {forbidden!r} if m in sys.modules or any(k.startswith(m + '.') for k in sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert loaded.stdout.strip() == "", f"import {module} loaded {loaded.stdout.strip()}"


def test_the_command_line_parser_loads_no_torch():
    # `nas --help` stays fast, and a command can set thread settings (OMP_*) before torch loads
    code = "import sys; from nas.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "False"


if __name__ == "__main__":
    g = graph()
    up, circles = upward_imports(g), cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports of nas modules")
    print(f"upward imports: {len(up)}")
    print(*up, sep="\n") if up else None
    print(f"import cycles: {len(circles)}")
    for c in circles:
        print("  " + " <-> ".join(c))
