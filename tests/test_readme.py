"""Every example in README and the docs runs (issue 34, check a; issue 36): each page's shell blocks (every
line a `maskcls ...` command) and Python blocks, in the page's order, on data_samples.

A documented command that breaks fails CI. Each page runs in a work folder of its own laid out as the docs
assume: `data_samples/`, `input/data/{train,eval}` (data_samples' folders) and `CROPS` (the crops of
data_samples/train); every other path is the command's own (runs/..., crops/...). The manual step between two commands (README: "download
label_fixes.csv" from audit's page) is done by the test. Sizes are scaled to a CPU test, never the command
itself: --epochs 1, --folds 2, --trials 2, --img-size 32 (given or not), --weights none (no download offline),
--patience 0, --batch-size 16.
A block that cannot run here carries `<!-- readme-test: not run (why) -->` before it; the marks are counted
and named in the test's output, and a new one fails until it is counted here; an unmarked shell block with a
line that is not a maskcls command fails too.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES

pytestmark = pytest.mark.slow

MARK = re.compile(r"<!--\s*readme-test:\s*not run\s*\((.+?)\)\s*-->")
# the marked blocks, counted: page -> reasons
NOT_RUN = {"README.md": ["CI runs it: .ci/run", "CI runs it: .ci/run", "PyTorch's CPU index is not reachable offline"],
           "docs/getting-started.md": ["CI runs it: .ci/run", "CI runs it: .ci/run",
                                       "PyTorch's CPU index is not reachable offline"],
           "docs/tutorials/tune.md": ["two GPUs", "a PostgreSQL server on another machine", "several GPUs",
                                      "two machines of 8 GPUs"],
           "docs/tutorials/export-serve.md": ["a running maskcls serve", "a running maskcls serve"]}
PAGES = ["README.md", "docs/index.md", "docs/getting-started.md", "docs/tutorials/competition.md",
         "docs/tutorials/audit-loop.md", "docs/tutorials/export-serve.md", "docs/tutorials/tune.md",
         "docs/tutorials/notebook.md", "docs/reference/commands.md", "docs/reference/formats.md",
         "docs/reference/what-happens-when.md", "docs/development.md"]
SCALE = [(r"--epochs \d+", "--epochs 1"), (r"--folds \d+", "--folds 2"), (r"--trials \d+", "--trials 2"),
         (r"--img-size \d+", "--img-size 32"), (r"--weights imagenet", "--weights none"),
         (r"--patience \d+", "--patience 0"), (r"--batch-size \d+", "--batch-size 16")]


def page_blocks(text: str) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(runnable entries in order: ("sh", a maskcls command) / ("step", a person's step) / ("python", code),
    the marks' reasons, the unmarked shell lines that are no maskcls command)."""
    entries, marks, bad, lines = [], [], [], text.splitlines()
    k = 0
    while k < len(lines):
        if not lines[k].startswith("```"):
            k += 1
            continue
        lang = lines[k][3:].strip()
        marked = MARK.search(lines[k - 1]) if k else None
        end = next(j for j in range(k + 1, len(lines)) if lines[j].startswith("```"))
        block = lines[k + 1:end]
        k = end + 1
        if marked:
            marks.append(marked.group(1))
        elif lang == "python":
            entries.append(("python", "\n".join(block)))
        elif lang in ("", "bash", "sh", "console"):
            joined, buf = [], ""
            for line in block:
                buf += line.rstrip().rstrip("\\") + " " if line.rstrip().endswith("\\") else line
                if not line.rstrip().endswith("\\"):
                    joined.append(buf)
                    buf = ""
            for line in joined:
                code = line.split("  #")[0].strip()
                if code.startswith("maskcls "):
                    entries.append(("sh", code))
                elif line.strip().startswith("#") and "label_fixes.csv" in line:
                    entries.append(("step", line.strip()))
                elif code and not code.startswith("#"):
                    bad.append(code)
    return entries, marks, bad


def readme_commands(text: str) -> tuple[list[str], list[str], list[str]]:
    """The maskcls commands and steps of a page, its marks, its steps (for tools that read README alone)."""
    entries, marks, _ = page_blocks(text)
    commands = [c for kind, c in entries if kind != "python"]
    return commands, marks, [c for c in commands if c.startswith("#")]


def scaled(command: str) -> str:
    for pattern, repl in SCALE:
        command = re.sub(pattern, repl, command)
    if command.split()[1] in ("train", "tune"):  # the defaults' sizes too: 10 epochs at 224 px is no CPU test
        command += "".join(f" {k} {v}" for k, v in (("--epochs", 1), ("--img-size", 32)) if k not in command)
    return command


@pytest.mark.parametrize("page", PAGES)
def test_every_example_of_the_page_runs_on_data_samples(page, tmp_path, cli_run, sample_crops):
    import subprocess
    import sys

    entries, marks, bad = page_blocks((REPO / page).read_text())
    assert marks == NOT_RUN.get(page, []), f"{page}: not-run marks changed: {marks}"
    assert not bad, f"{page}: an unmarked shell block runs what this test cannot: {bad}"
    work = tmp_path / "w"
    (work / "input" / "data").mkdir(parents=True)
    shutil.copytree(SAMPLES, work / "data_samples")
    for part in ("train", "eval"):
        (work / "input" / "data" / part).symlink_to(work / "data_samples" / part)
    shutil.copytree(sample_crops, work / "CROPS")
    ran, cells = 0, []
    for kind, code in entries + [("end", "")]:
        if cells and kind != "python":  # a page's Python blocks are a notebook's cells: one process, in order
            res = subprocess.run([sys.executable, "-c", "\n".join(cells)], cwd=work, capture_output=True, text=True,
                                 timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
            out = res.stdout + res.stderr
            assert res.returncode == 0, f"{page}'s Python blocks failed:\n{out[-3000:]}"
            assert not re.search(r"\b[A-Z]\w*Warning\b", out), f"{page}'s Python blocks\n{out[-3000:]}"
            ran, cells = ran + len(cells), []
        if kind == "end":
            break
        if kind == "python":
            cells.append(code)
            continue
        if kind == "step":  # a person's step: the fixes they downloaded from the audit page
            page_fixes = sorted(work.glob("runs/*audit*/label_fixes.csv"))
            assert page_fixes, f"{page}'s step {code!r}: no audit ran before it"
            shutil.copyfile(page_fixes[-1], work / "label_fixes.csv")
            continue
        args = scaled(code).split()[1:]
        res = cli_run(*args, cwd=work, timeout=900)
        what = f"{page}'s `{code}` (ran as `maskcls {' '.join(args)}`)"
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"{what} failed:\n{out[-3000:]}"
        assert "Traceback" not in out and not re.search(r"\b[A-Z]\w*Warning\b", out), f"{what}\n{out[-3000:]}"
        ran += 1
    print(f"{page}: {ran} examples run, {len(marks)} blocks marked not run ({'; '.join(marks)})")
    if page == "README.md":  # `maskcls crop EVAL --prior RUN` crops with the face prior the run's card holds
        from classify.inference.cropping import prior_of
        from preprocess.manifest import read_meta

        assert read_meta(work / "crops" / "eval")["prior_used"] == prior_of(work / "runs" / "r").to_dict()


def test_the_docs_build_strict_and_every_readme_link_resolves():
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 10_500  # what it is, install, the two commands, a short example, links
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and all((REPO / link).exists() for link in links if "://" not in link), links
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "/tmp/maskcls-site-test"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    cli = (REPO / "docs" / "reference" / "cli.md").read_text()  # made from the Typer app at build time
    assert "## `maskcls audit`" in cli and "`--min-score`" in cli and "`--prior`" in cli
