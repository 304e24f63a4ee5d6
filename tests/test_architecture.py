"""The rooms of docs/ARCHITECTURE.md: who may import whom, no cycles, small modules, a light CLI start-up."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "captioning", "indexer", "ui")
# rooms that nothing at runtime may import: the tools (command line, evaluation and benchmarks), the
# training code of the model packages, and the app
TOOLS = ("indexer.cli", "indexer.lab")
TRAINING = ("retrieval.native.training", "captioning.training")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (absolute imports; the project uses no others)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def within(name: str, rooms: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rooms)


def test_models_know_nothing_of_storage_tools_or_ui():
    for name, path in modules().items():
        if within(name, ("retrieval", "captioning")):
            tops = {m.split(".")[0] for m in imports(path)}
            assert not tops & {"faiss", "sqlalchemy", "streamlit", "fastapi", "indexer", "ui"}, name


def test_retrieval_imports_no_captioning():
    for name, path in modules().items():
        if within(name, ("retrieval",)):
            assert not any(within(m, ("captioning",)) for m in imports(path)), name


def test_nothing_at_runtime_imports_tools_training_or_the_app():
    for name, path in modules().items():
        if within(name, TOOLS + TRAINING + ("ui",)):
            continue
        bad = sorted(m for m in imports(path) if within(m, TOOLS + TRAINING + ("ui",)))
        assert not bad, f"{name} imports {bad}"


def test_only_the_ui_command_names_the_app_and_nothing_imports_it():
    refs = []
    for name, path in modules().items():
        if within(name, ("ui",)):
            continue
        assert not any(within(m, ("ui",)) for m in imports(path)), name
        refs += [f"{name}: {line.strip()}" for line in path.read_text().splitlines()
                 if re.search(r"""["']ui\.app["']""", line)]
    assert refs == ['indexer.cli.everyday: APP_MODULE = "ui.app"'], refs
    from indexer.cli.everyday import app_path

    assert app_path() == REPO / "ui" / "app.py"


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}
    # a package's __init__ is imported by its submodules' importers; count edges to real modules only
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


def test_modules_stay_small():
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_no_private_engine_method_is_used_outside_the_engine():
    engine = REPO / "indexer" / "engine.py"
    tree = ast.parse(engine.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    private = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)
               and n.name.startswith("_") and not n.name.startswith("__")}
    assert private  # the check below has something to look for
    offenders = []
    for path in [*REPO.glob("*/**/*.py"), *REPO.glob("tests/*.py")]:
        if path == engine or ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders


def test_cli_start_up_imports_no_heavy_library():
    code = ("import sys; import indexer.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'faiss', 'transformers', 'timm', 'open_clip', 'sqlalchemy', 'numpy', "
            "'streamlit', 'fastapi', 'uvicorn', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_only_serve_and_the_lab_reach_the_http_api():
    """FastAPI is an optional extra: nothing but ``pixquery serve`` (cli/teams.py, importing it inside the
    command) and the API benchmark imports ``indexer.api``."""
    allowed = {"indexer/cli/teams.py", "indexer/lab/bench_api.py"}
    for path in (REPO / "indexer").rglob("*.py"):
        rel = str(path.relative_to(REPO))
        if rel.startswith("indexer/api/") or rel in allowed:
            continue
        source = path.read_text()
        assert "indexer.api" not in source and "fastapi" not in source, rel
