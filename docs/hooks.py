"""mkdocs hooks: the pages made from the code and the repository at build time, so they cannot drift.

- reference/cli.md: every command, argument and option from the Typer app itself (what `--help` prints).
- benchmarks.md: BENCHMARKS.md as it is in the repository (its links into docs/img made relative).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli_reference() -> str:
    sys.path.insert(0, str(ROOT))
    import typer

    from cli import app

    group = typer.main.get_command(app)  # typer carries its own click: its Context, not the click package's
    Context = type(typer.main.get_command(app).make_context("maskcls", ["--help"], resilient_parsing=True))
    ctx = Context(group, info_name="maskcls")
    out = ["# Command line reference",
           "",
           "Made from the commands themselves when the docs are built (docs/hooks.py): the same words as "
           "`maskcls COMMAND --help`. The commands in depth, with examples: [the commands](commands.md).", ""]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        sub = Context(cmd, info_name=name, parent=ctx)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        out += [f"## `maskcls {name}`", "", (cmd.help or "").strip(), "", f"```text\nmaskcls {name} {usage}\n```", ""]
        rows = []
        for p in cmd.params:
            if p.name == "help":
                continue
            if p.param_type_name == "argument":
                what = f"`{p.metavar or p.name.upper()}`"
                kind = "argument" + (", required" if p.required else "")
            else:
                what = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                kind = "required" if p.required else ("flag" if getattr(p, "is_flag", False) else
                                                     "optional" if p.default is None else f"default `{_default(p)}`")
            text = (getattr(p, "help", None) or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {what} | {kind} | {text} |")
        if rows:
            out += ["| argument / option | | what |", "| --- | --- | --- |", *rows, ""]
    return "\n".join(out) + "\n"


def _default(p) -> str:
    d = p.default
    if callable(d):
        return "computed"
    if d is None:
        return "as the text says"
    if isinstance(d, (list, tuple)):
        return ", ".join(map(str, d)) or "none"
    return str(d)


def on_pre_build(config, **kwargs) -> None:
    docs = Path(config["docs_dir"])
    (docs / "reference" / "cli.md").write_text(cli_reference(), encoding="utf-8")
    bench = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    # its figures live in docs/img: a link from the repository's root, made relative to the docs page
    (docs / "benchmarks.md").write_text(bench.replace("](docs/img/", "](img/"), encoding="utf-8")
