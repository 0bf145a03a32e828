"""The commands that ship a trained model: export (one ONNX graph) and serve (HTTP with a page)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import check_outputs, console, require_extra, user_errors, warning


@user_errors
def export(
    paths: list[Path] = typer.Argument(..., metavar="CKPT...", help="Checkpoint(s) or run folders (a k-fold run: "
                                                                     "every fold, averaged in the graph)."),
    out: Path = typer.Option(..., "--out", "-o", help="The ONNX file to write."),
    int8: bool = typer.Option(False, "--int8", metavar="", help="Quantise to int8 (static, calibrated on the run's "
                                                                "validation crops); prints the accuracy change."),
    crops: Optional[Path] = typer.Option(None, help="Crops folder for the parity check and --int8 (default: the "
                                                    "run's own, from its config)."),
):
    """Export the classifier as one ONNX graph (uint8 crops in, each model's logits out; predict and serve apply the card's temperature) for predict and serve without torch."""
    check_outputs(files={"--out": out}, reads=[*paths, *([crops] if crops else [])], model_out=True)
    require_extra("export", "maskcls export")
    from classify.deploy.export import export as run_export

    res = run_export(paths, out, int8=int8, check_crops=crops)
    console.print(f"exported {res.models} model(s) to {escape(str(res.path))} ({res.path.stat().st_size / 1e6:.1f} MB); "
                  f"onnxruntime vs torch on {res.checked} crops: max probability difference {res.parity:.2e}",
                  highlight=False)
    if res.int8:
        q = res.int8
        console.print(f"int8 on {q['photos']} validation photos: macro F1 {q['fp32_f1']:.4f} → {q['int8_f1']:.4f}, "
                      f"accuracy {q['fp32_acc']:.4f} → {q['int8_acc']:.4f}, same top class for {q['agree']:.1%}",
                      highlight=False)
    for note in res.notes:
        warning(f"onnxruntime's quantiser: {note}")


@user_errors
def serve(
    model: Path = typer.Argument(..., metavar="MODEL", help="model.onnx (maskcls export), or a checkpoint or run "
                                                            "folder (exported first, into a temporary file)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 "
                                               "serves the network (see README)."),
    port: int = typer.Option(8000, help="Port."),
    max_bytes: int = typer.Option(10_000_000, help="Largest request body, bytes."),
    max_files: int = typer.Option(16, help="Most photos in one request."),
    max_pixels: int = typer.Option(50_000_000, help="Most decoded pixels in one request (the server holds at most "
                                                    "three requests' worth at once; past that it answers 503)."),
    wait_ms: float = typer.Option(5.0, help="How long the server gathers concurrent requests into one batch, ms."),
):
    """Serve the model over HTTP: POST /predict (multipart field `file`), GET /health, and a page at /."""
    import tempfile

    from classify.errors import ConfigError
    from classify.inference.onnx_model import is_onnx

    require_extra("serve", "maskcls serve")
    if not is_onnx(model):
        require_extra("export", f"maskcls serve {model} (a checkpoint is exported to ONNX first)")
    for name, value, lo in (("--port", port, 1), ("--max-bytes", max_bytes, 1), ("--max-files", max_files, 1),
                            ("--max-pixels", max_pixels, 1)):
        if value < lo or (name == "--port" and value > 65535):
            raise ConfigError(f"{name} {value}: must be {'in 1..65535' if name == '--port' else '>= 1'}")
    try:
        from classify.deploy.serve import serve as run_serve
    except ImportError:
        raise ConfigError("maskcls serve needs fastapi and uvicorn: pip install 'maskcls[serve]'") from None
    with tempfile.TemporaryDirectory(prefix="maskcls-serve-") as tmp:
        if not is_onnx(model):
            from classify.deploy.export import export as run_export

            console.print(f"exporting {escape(str(model))} to ONNX first…", highlight=False)
            model = run_export([model], Path(tmp) / "model.onnx").path
        run_serve(model, host, port, max_bytes, max_files, wait_ms,
                  on_ready=lambda: console.print(f"serving {escape(str(model))} on http://{host}:{port}/ "
                                                 "(Ctrl-C stops)", highlight=False), max_pixels=max_pixels)
