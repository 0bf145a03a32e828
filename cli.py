"""maskcls command line: crop → train → predict, and the commands around them.

Each command turns its options into the library's config and calls one entry function (cli_commands/,
one module per stage); the project's own errors become a one-line message and exit code 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer

if __package__ in (None, "") and str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python cli.py` from a checkout

from cli_commands import crop, deploy, predict, study, train  # noqa: E402
from cli_commands.common import Command, Group  # noqa: E402


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Face crops, training and prediction for mask status x gender x age group.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"maskcls {version('maskcls')}")
        except PackageNotFoundError:
            typer.echo("maskcls (not installed: run from a checkout; pip install -e . gives it a version)")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                      help="Print maskcls's version and exit.")):
    """maskcls: raw photos → face crops → trained classifier → submission."""


# The pipeline, in the order a user runs it.
app.command(cls=Command)(crop.crop)                      # raw photos → CROPS (face crops + manifest.csv)
app.command(cls=Command)(train.train)                    # CROPS → RUN (best.pt, metrics, predictions)
app.command(cls=Command)(predict.predict)                # RUN + eval photos → submission.csv
app.command("pseudo-label", cls=Command)(predict.pseudo_label)  # RUN + eval photos → confident crops for train --extra
app.command(cls=Command)(predict.evaluate)               # RUN + labelled CROPS → scores, per class
app.command(cls=Command)(study.report)                   # CROPS (+ RUN) → figures and index.html
app.command(cls=Command)(deploy.export)                  # RUN → model.onnx
app.command(cls=Command)(deploy.serve)                   # model.onnx → HTTP with a page
app.command(cls=Command)(predict.explain)                # RUN + photos → Grad-CAM per task
app.command(cls=Command, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(study.tune)  # CROPS → study
app.command("compare", cls=Command)(study.compare_runs)    # RUNs → side by side
app.command(cls=Command)(study.audit)                    # k-fold RUN → suspect labels, label_fixes.csv

if __name__ == "__main__":
    app()
