"""The code style is a test: ruff's lint and format checks over the package, tests and benchmarks
(configuration in pyproject.toml, line length 120)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["pipeline", "tests", "benchmarks"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return subprocess.run([exe, *args, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_is_clean():
    proc = ruff("check", "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean():
    proc = ruff("format", "--check", "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_function_in_the_package_is_longer_than_120_lines():
    """A long stage reads as a list of calls to functions that each do one job (docs/development.md)."""
    import ast

    long = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 120:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_readme_and_docs_prose_is_wrapped():
    """Prose lines of README.md and docs/ stay under 120 characters (tables and code blocks are
    exempt): the docs read in a terminal."""
    long = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        code = False
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                code = not code
            elif not code and not line.startswith("|") and len(line) > 120:
                long.append(f"{path.relative_to(ROOT)}:{i} ({len(line)} characters)")
    assert not long, long


#: a dependency's distribution name -> the import names that use it
IMPORT_NAMES = {
    "scikit-learn": ("sklearn",),
    "pillow": ("PIL",),
    "pyyaml": ("yaml",),
    "scikit-image": ("skimage",),
    "tensorboard": ("tensorboard", "torch.utils.tensorboard"),
}


def test_every_declared_dependency_is_imported():
    """No dependency in pyproject.toml that nothing imports (in pipeline/, the Snakefile, rules/)."""
    import re

    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    code = "\n".join(p.read_text() for p in [*(ROOT / "pipeline").rglob("*.py"), ROOT / "Snakefile"])
    code += "\n".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    unused = []
    for dep in deps:
        dist = re.split(r"[<>=!~ ]", dep, maxsplit=1)[0].lower()
        names = IMPORT_NAMES.get(dist, (dist.replace("-", "_"),))
        if not any(re.search(rf"^\s*(from|import) {re.escape(n)}\b", code, re.M) for n in names):
            unused.append(dist)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"
