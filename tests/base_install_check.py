"""The base install on its own: run by .ci/run in a fresh venv holding only `pip install -e .`, after
`make demo` (crop, train, report, predict) wrote DEMO/.

    python tests/base_install_check.py DEMO

It checks what the test suite cannot, since the suite's environment has every extra: that no extra's
package is installed here (the base stays lean), that evaluate, compare and pseudo-label work, and that
each command needing an extra stops with one `error:` line naming it. `EXTRA_COMMANDS` is shared with
tests/test_extras.py, which runs the same commands with the extras hidden by an import hook.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (argv after `maskcls`, the extra it needs, the modules to hide so that it is missing). {run} a run folder,
# {crops} its crops, {eval} an eval folder, {photo} a photo, {tmp} a scratch folder.
EXTRA_COMMANDS = [
    (["export", "{run}", "--out", "{tmp}/model.onnx"], "export", ("onnx", "onnxscript")),
    (["serve", "{tmp}/model.onnx", "--port", "1"], "serve", ("fastapi", "uvicorn")),
    (["serve", "{run}", "--port", "1"], "export", ("onnx",)),
    (["predict", "{tmp}/model.onnx", "{eval}", "--out", "{tmp}/sub.csv"], "serve", ("onnxruntime",)),
    (["tune", "{crops}", "--out", "{tmp}/study", "--trials", "1", "--epochs", "1"], "tune", ("optuna",)),
    (["explain", "{run}", "{photo}", "--out", "{tmp}/explain"], "explain", ("pytorch_grad_cam",)),
    (["train", "{crops}", "--out", "{tmp}/timm", "--model", "timm/resnet18", "--epochs", "1"], "timm", ("timm",)),
    (["audit", "{run}", "--out", "{tmp}/audit"], "audit", ("cleanlab",)),
]
EXTRA_MODULES = sorted({m for _, _, mods in EXTRA_COMMANDS for m in mods} | {"tensorboard", "optuna", "onnxruntime"})


def fill(argv: list[str], **paths) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


def one_error_line(stderr: str) -> str | None:
    """The `error:` line when stderr is that line alone (no traceback, no usage box), else None."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 and lines[0].startswith("error:") else None


def main(demo: Path) -> int:
    import importlib.util

    failures = []
    present = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is not None]
    if present:
        failures.append(f"the base install brought extras' packages: {', '.join(present)}")
    run, crops = demo / "run", demo / "crops"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "model.onnx").write_bytes(b"not a model")
        paths = dict(run=run, crops=crops, eval=REPO / "data_samples" / "eval", tmp=tmp,
                     photo=next((REPO / "data_samples" / "eval" / "images").iterdir()))
        works = [["evaluate", str(run), str(crops)], ["compare", str(run), str(run), "--out", str(tmp / "compare")],
                 ["pseudo-label", str(run), str(demo / "eval_crops"), "--out", str(tmp / "pseudo"), "--min-prob", "0.01"]]
        for argv in works:
            r = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, cwd=REPO)
            print(f"maskcls {' '.join(argv[:1])}: exit {r.returncode}")
            if r.returncode != 0:
                failures.append(f"maskcls {' '.join(argv)} failed on the base install:\n{r.stderr[-2000:]}")
        for argv, extra, _ in EXTRA_COMMANDS:
            argv = fill(argv, **paths)
            r = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, cwd=REPO)
            line = one_error_line(r.stderr)
            print(f"maskcls {argv[0]} without [{extra}]: exit {r.returncode}: {line}")
            # Here every extra is missing: the line names the first one the command needs.
            if r.returncode != 1 or line is None or "pip install 'maskcls[" not in line:
                failures.append(f"maskcls {' '.join(argv)}: exit {r.returncode}, want one error: line naming the "
                                f"extra to install; stderr:\n{r.stderr[-2000:]}")
    for f in failures:
        print("FAIL:", f)
    print("base install check:", "failed" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
