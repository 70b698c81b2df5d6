"""The house: imports flow downward only, vllm stays in one module, and the run directory's written
layout is true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("cascade", "stages")
# the modules that iterate the steps of stages/ (the run's table): beside them, not below
CONTROLLERS = ("cascade.driver", "cascade.plan", "cascade.__main__")
# data/: the harness tasks' code, loaded by lm-eval; benchmarks/: on top
SCANNED = (*PACKAGES, "data", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in SCANNED:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imports(f: Path) -> set[str]:
    """Every module named by an import anywhere in the file (lazy imports inside functions
    included)."""
    names = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _loaded_by_name() -> dict[str, set[str]]:
    """Arrows no import statement shows: the sub-commands __main__ imports by name, the built-in
    phase kinds and the backends their registries load by name, and the code that lm-eval loads from
    data/harness/ (`!function utils.x` in a task's YAML) for cascade/harness.py, which points it
    there."""
    from cascade.__main__ import SUBCOMMANDS
    from cascade.generation import BACKENDS
    from cascade.phases import BUILTIN
    from stages import STEPS

    functions = {f"data.harness.{m.group(1)}" for y in (ROOT / "data/harness").glob("*.yaml")
                 for m in re.finditer(r"!function (\w+)\.", y.read_text())}
    return {"cascade.__main__": {f"cascade.{module}" for module, _ in SUBCOMMANDS.values()},
            "cascade.harness": functions, "cascade.phases": set(BUILTIN.values()),
            "cascade.generation": set(BACKENDS.values()), "stages": set(STEPS.values())}


def _graph() -> dict[str, set[str]]:
    mods, extra = _modules(), _loaded_by_name()
    for m, deps in extra.items():
        assert m in mods and deps <= set(mods), (m, deps - set(mods))
    return {m: {i for i in _imports(f) | extra.get(m, set()) if i in mods and i != m} for m,
            f in mods.items()}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail(f"import circle: {' -> '.join(path + [m, n])}")
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_steps_and_library_never_import_the_driver():
    graph = _graph()
    importers = sorted(m for m, deps in graph.items() if "cascade.driver" in deps)
    assert importers == ["cascade.__main__"], importers
    # the library below the driver and the planner knows no step: types flow downward only
    upward = sorted((m, d) for m,
                    deps in graph.items() if m.startswith("cascade") and m not in CONTROLLERS
                    for d in deps if d.startswith("stages"))
    assert not upward, upward


def test_arrows_point_down_through_data_and_benchmarks_too():
    """benchmarks/ on top (nothing imports them); the driver and the steps; the library with data/'s
    code (lm-eval loads it for cascade/harness.py; it may use the library, e.g. cascade.metrics, but
    no step and not the driver). Within a level, test_no_import_circle keeps the order."""
    graph = _graph()
    assert "data.harness.utils" in graph["cascade.harness"]  # the name-loaded arrow is seen

    def level(m: str) -> int:
        if m in CONTROLLERS:
            return 2
        return {"benchmarks": 3, "stages": 2, "cascade": 1, "data": 1}[m.split(".")[0]]

    up = sorted((m, d) for m, deps in graph.items() for d in deps if level(d) > level(m))
    assert not up, up


def test_vllm_is_imported_in_exactly_one_module():
    users = sorted(m for m,
                   f in _modules().items() if any(i.split(".")[0] == "vllm" for i in _imports(f)))
    assert users == ["cascade.generation.vllm_backend"], users


def test_backends_and_phase_kinds_are_rooms():
    """Each backend, each built-in phase kind and each step declares what its registry asks, and no
    module outside a backend's own compares the configured backend's name: it asks the registry
    (cascade/generation/__init__.py)."""
    from cascade import generation, phases

    for name in generation.BACKENDS:
        missing = [d for d in generation.DECLARES if not hasattr(generation.load(name), d)]
        assert not missing, (name, missing)
    for kind in phases.BUILTIN:
        phases.load(kind)  # refuses a module that does not declare phases.DECLARES
    import stages

    for kind in stages.STEPS:  # the step contract: each step module runs and costs its steps
        missing = [d for d in stages.DECLARES if not callable(getattr(stages.load(kind), d, None))]
        assert not missing, (kind, missing)
    own = set(generation.BACKENDS.values()) | {"cascade.generation"}
    compared = []
    for m, f in _modules().items():
        if m in own:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                sides = [ast.unparse(x) for x in (node.left, *node.comparators)]
                if any(s.endswith(("backend.name", "b.name")) for s in sides):
                    compared.append((m, node.lineno, ast.unparse(node)))
    assert not compared, compared


def test_sizes_a_reader_can_hold():
    """No file in cascade/ and stages/ over 350 lines, no function there over 50; no line of the
    project's Python over 100 columns."""
    def files(dirs: tuple[str, ...]) -> list[Path]:
        return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]

    big, long_functions = [], []
    for p in files(PACKAGES):
        text, where = p.read_text(), p.relative_to(ROOT)
        if (n := len(text.splitlines())) > 350:
            big.append(f"{where}: {n}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > 50:
                    long_functions.append(f"{where}:{node.lineno} {node.name}: {n}")
    wide = [f"{p.relative_to(ROOT)}:{i}" for p in files((*SCANNED, "tests", "scripts"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > 100]
    assert not big and not long_functions and not wide, (big, long_functions, wide[:20])


def test_benchmarks_use_public_names_only():
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        text = f.read_text()
        assert "sys.path" not in text, f.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, (f.name, node.module, private)


def _documented() -> list[tuple[str, re.Pattern]]:
    """The layout in cascade/layout.py's docstring: each entry's paths as regexes over run-relative
    paths."""
    from cascade import layout

    lines = layout.__doc__.split("<run_dir>/", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    out = []
    for line in lines:
        if not line.startswith("      ") or line.startswith("       "):
            continue  # a continuation of the description column
        entry = re.split(r"\s{2,}", line.strip())[0]
        first, *rest = [e.strip() for e in entry.split(",")]
        base = first.rsplit("/", 1)[0] + "/" if "/" in first else ""
        for name in [first] + [base + r for r in rest]:
            rx = re.escape(name).replace(r"\*\*", ".*").replace(r"\*", "[^/]+")
            rx = rx.replace(r"\<", "<").replace(r"\>", ">")
            rx = re.sub(r"<?(N+)>?", lambda m: f"[0-9]{{{len(m.group(1))}}}", rx)
            rx = re.sub(r"<[a-z]+>", "[^/]+", rx)
            out.append((name, re.compile(rx + "$")))
    return out


@pytest.mark.slow
def test_the_written_layout_is_what_a_run_writes(tiny_4b_run: Path):
    documented = _documented()
    assert len(documented) >= 15, [n for n, _ in documented]
    files = [str(p.relative_to(tiny_4b_run)) for p in tiny_4b_run.rglob("*") if p.is_file()]
    undocumented = [f for f in files if not any(rx.match(f) for _, rx in documented)]
    assert not undocumented, undocumented[:10]
    # logprobs off
    optional = {"generations/<teacher>/<data>/<key>/shards/shard-NNNNN.logprobs.npz",
                # none unfinished
                "generations/<teacher>/<data>/<key>/shards/shard-NNNNN.partial.jsonl",
                "tmp/**",  # staging cleaned
                "models/<key>/**",  # an object store's run directory only
                "<stage>/release/README.md", "<stage>/release/release.json", "<stage>/release/hf/*",
                "<stage>/release/gguf/*.gguf"}  # release.enabled only (tests/test_release.py)
    missing = [n for n,
               rx in documented if n not in optional and not any(rx.match(f) for f in files)]
    assert not missing, missing
