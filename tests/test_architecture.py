"""The package rooms of docs/ARCHITECTURE.md: who may import whom, and a light CLI start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_models_know_nothing_of_storage_or_ui():
    for package in ("retrieval", "captioning"):
        for path, names in imported_modules(package).items():
            assert not names & {"faiss", "sqlalchemy", "streamlit", "indexer", "ui"}, path


def test_nothing_imports_ui():
    for package in ("retrieval", "captioning", "indexer"):
        for path, names in imported_modules(package).items():
            assert "ui" not in names, path


def test_cli_start_up_imports_no_heavy_library():
    code = ("import sys; import indexer.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'faiss', 'transformers', 'timm', 'open_clip', 'sqlalchemy', 'fastapi', "
            "'uvicorn') "
            "if m in sys.modules))")
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
