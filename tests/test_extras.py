"""Each command that needs an extra, run in a real interpreter where that extra's packages cannot be
imported (an import hook, as if they were not installed): one `error:` line naming the extra, exit 1.
.ci/run runs the same commands in a fresh venv with the base install only (tests/base_install_check.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.base_install_check import EXTRA_COMMANDS, fill, one_error_line

from .conftest import REPO

HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv.pop(1).split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
sys.argv[0] = "cli.py"
import runpy
runpy.run_path("cli.py", run_name="__main__")
"""


@pytest.mark.parametrize("argv, extra, hidden", EXTRA_COMMANDS, ids=[f"{a[0]}-{e}" for a, e, _ in EXTRA_COMMANDS])
def test_a_command_whose_extra_is_missing_names_it_in_one_error_line(argv, extra, hidden, sample_crops, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    argv = fill(argv, run=tmp_path / "run", crops=sample_crops, eval=REPO / "data_samples" / "eval", tmp=tmp_path,
                photo=next((REPO / "data_samples" / "eval" / "images").iterdir()))
    r = subprocess.run([sys.executable, "-c", HIDE, ",".join(hidden), *argv], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and line is not None, r.stderr[-3000:]
    assert f"pip install 'maskcls[{extra}]'" in line, line
    assert not any((tmp_path / d).exists() for d in ("study", "timm", "audit"))  # refused before any work


def test_the_hook_hides_what_it_is_given():
    """Without this, the test above could pass against an environment that simply lacks the extras."""
    r = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('optuna') is not None)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "True"  # the test environment has the extras: the hook is what hides them
