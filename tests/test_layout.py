"""The code's floor plan, checked: module and function sizes, and commands that compute without
printing. (The layers and the absence of import cycles are checked by ``lint-imports`` with
``.importlinter``, which ``make test`` runs before this suite.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "model_audit"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{_name(path)}: split it"
    long = [(node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{_name(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_commands_return_results_and_do_not_print() -> None:
    """A command returns a result (and writes only its product: fix's repaired checkpoint);
    printing and the CLI's progress bars are :mod:`model_audit.outputs`' and the CLI's."""
    found = []
    for path in sorted((PACKAGE / "commands").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                    f, ast.Attribute) else ""
                if name in ("print", "echo", "tqdm"):
                    found.append(f"{_name(path)}:{node.lineno} {name}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("click", "tqdm") for n in names):
                    found.append(f"{_name(path)}:{node.lineno} imports click/tqdm")
    assert not found, found


def test_import_linter_contracts_name_every_top_level_module() -> None:
    """Every top-level module or package of model_audit has its place in the layers contract,
    so a new one cannot sit outside the floor plan unnoticed."""
    text = (PACKAGE.parent / ".importlinter").read_text(encoding="utf-8")
    layers = text.split("layers =", 1)[1].split("\n\n", 1)[0]
    named = {part.strip().split(".")[1] for line in layers.splitlines()
             for part in line.split("|") if part.strip()}
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
            or (p.is_dir() and (p / "__init__.py").is_file())}
    assert tops <= named, f"not in .importlinter's layers: {sorted(tops - named)}"
