"""A zygote for command-line tests: it imports maskcls and its heavy libraries (torch, torchvision,
OpenCV, Optuna) once, then forks one child per command, which runs exactly as `python cli.py ARGS`
would: its own process, its own stdout and stderr, its exit status (a traceback and exit 1 where an
exception escapes, as Python's own). What a fork saves is the ~6 s of imports (and matplotlib's first
figure) each real start pays on these 2-core machines, on the ~100 command lines the tests run.

Protocol, one JSON object a line: the zygote first says {"ready": true} (or false, with why, when it
cannot fork safely; the tests then start real interpreters); then the test writes {"argv", "cwd",
"stdout", "stderr", "timeout"} on stdin and the zygote answers {"rc"} once the child has ended (rc -9
when it was killed at the timeout).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
import classify.inference.evaluate  # noqa: E402,F401
import classify.inference.torch_backend  # noqa: E402,F401
import classify.inference.pseudo  # noqa: E402,F401
import classify.study.report  # noqa: E402,F401
import classify.training.train  # noqa: E402,F401
import preprocess.crop  # noqa: E402,F401

for extra in ("classify.study.tune", "classify.deploy.export", "classify.study.explain", "onnxruntime"):  # where installed
    try:
        importlib.import_module(extra)
    except ImportError:  # the extra is not installed: its commands say so themselves
        pass

# matplotlib's pyplot, its fonts and the Agg renderer, as the first figure loads them: ~0.45 s a command
# otherwise, and train, report, compare, audit, tune and explain each draw figures.
import io  # noqa: E402

from classify.plots import pyplot  # noqa: E402

_fig = pyplot().figure(figsize=(1, 1))
_fig.text(0.5, 0.5, "warm")
_fig.savefig(io.BytesIO(), format="png")  # in memory: nothing written
pyplot().close(_fig)


def _child(req: dict) -> int:
    os.chdir(req["cwd"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.argv = [str(REPO / "cli.py"), *req["argv"]]
    code = 0
    try:
        cli.app(prog_name="cli.py")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    if threading.active_count() != 1:  # a library started a thread at import: forking it could deadlock
        print(json.dumps({"ready": False, "why": f"{threading.active_count()} threads after the imports"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(req))
        deadline = time.monotonic() + req.get("timeout", 600)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = -9
                break
            time.sleep(0.02)
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    main()
