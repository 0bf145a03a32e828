"""Every import of the product is declared (deptry, configured in pyproject.toml): in the base install, or
in the extra of the command that needs it; no test-only package is imported by the product."""
from __future__ import annotations

import shutil
import subprocess
import sys

from .conftest import REPO


def deptry(root) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "deptry", ".", "--no-ansi"], capture_output=True, text=True, cwd=root, timeout=300,
                          env=os.environ | {"NO_COLOR": "1"})


def test_every_import_of_the_product_is_declared():
    r = deptry(REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_undeclared_import_fails_the_check(tmp_path):
    for name in ("pyproject.toml", "cli.py"):
        shutil.copy(REPO / name, tmp_path / name)
    for pkg in ("cli_commands", "classify", "preprocess"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    with open(tmp_path / "classify" / "metrics.py", "a") as f:
        f.write("\nimport requests  # noqa: E402 - installed here (by the test extras), declared nowhere\n")
    r = deptry(tmp_path)
    said = r.stdout + r.stderr
    # DEP001 where requests is not installed at all, DEP003 where something else brought it in
    assert r.returncode != 0 and ("DEP001 'requests'" in said or "DEP003 'requests'" in said), said


def lint_imports(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], capture_output=True, text=True, cwd=root, timeout=300)


def test_the_import_layers_hold():
    r = lint_imports(REPO)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout + r.stderr


def test_an_import_that_runs_up_a_layer_breaks_a_contract(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for pkg in ("cli_commands", "classify", "preprocess"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    with open(tmp_path / "classify" / "inference" / "answer.py", "a") as f:
        f.write("\nfrom classify.training import config  # noqa: E402,F401 - inference reaching up into training\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0 and "inference never imports training, study or deploy BROKEN" in r.stdout, r.stdout
