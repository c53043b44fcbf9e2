"""The import contract (DESIGN.md "Layers"): ``proto`` <- ``workers`` <- ``pied``.

Every import statement is checked, including the ones inside functions, so a lazy import cannot
hide a dependency that points upwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages of ours it must never import
FORBIDDEN = {"proto": {"workers", "pied"}, "workers": {"pied"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) for every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in imported_packages(path)
        if name in forbidden
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package):
    assert violations(package) == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check itself can fail: a lazy upward import inside a function is reported."""
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "bad.py").write_text("def f():\n    from pied.serve import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("workers") == ["workers/bad.py:2 imports pied"]


def test_workers_and_proto_load_without_pied():
    """At run time too: importing every worker entry point leaves ``pied`` unloaded."""
    code = (
        "import sys, workers.executor.actor, workers.scheduler.actor, workers.memory.actor, proto;"
        "print(sorted(m for m in sys.modules if m == 'pied' or m.startswith('pied.')))"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


def test_cli_imports_serve_directly():
    """No import of ``pied serve`` is swallowed: an error under it surfaces, not 'invalid choice'."""
    tree = ast.parse((ROOT / "pied" / "cli.py").read_text())
    handlers = [node for node in ast.walk(tree) if isinstance(node, ast.Try)]
    assert not any(
        isinstance(child, (ast.Import, ast.ImportFrom)) for handler in handlers for child in ast.walk(handler)
    )
