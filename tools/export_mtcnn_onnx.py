"""Write MTCNN's three nets as ONNX files into preprocess/nets/, from facenet-pytorch's own modules.

    pip install -e '.[dev]'          # onnx and onnxscript, for torch.onnx.export
    python tools/export_mtcnn_onnx.py

Run once when facenet-pytorch's weights or the export change; the files are committed, so the crop
stage reads them with OpenCV's DNN module and never imports torch. tests/test_detector.py checks the
shipped files against facenet-pytorch's nets on the same inputs. The weights are facenet-pytorch's
(MIT licence; see preprocess/nets/NOTICE.md).
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

OUT = Path(__file__).resolve().parent.parent / "preprocess" / "nets"

# name → (module, example input, output names in the module's return order)
NETS = {
    "pnet": (PNet, (1, 3, 40, 50), ["reg", "prob"]),
    "rnet": (RNet, (2, 3, 24, 24), ["reg", "prob"]),
    "onet": (ONet, (2, 3, 48, 48), ["reg", "landmarks", "prob"]),
}


def export(name: str, out: Path) -> str:
    cls, shape, outputs = NETS[name]
    net = cls().eval()  # pretrained=True: facenet-pytorch loads its shipped weights
    n = torch.export.Dim("n", min=1, max=65536)
    dims = {0: n}
    if name == "pnet":  # P-Net is fully convolutional: any image size
        dims |= {2: torch.export.Dim("h", min=12, max=16384), 3: torch.export.Dim("w", min=12, max=16384)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        torch.onnx.export(net, (torch.zeros(shape),), path, dynamo=True, input_names=["x"], output_names=outputs,
                          dynamic_shapes={"x": dims}, external_data=False, verbose=False)
        model = onnx.load(path)
    onnx.checker.check_model(model)
    model.doc_string = f"MTCNN {name} from facenet-pytorch's weights, exported by tools/export_mtcnn_onnx.py"
    data = model.SerializeToString()
    (out / f"{name}.onnx").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    import facenet_pytorch
    sums = {name: export(name, OUT) for name in NETS}
    meta = {"facenet_pytorch": facenet_pytorch.__version__ if hasattr(facenet_pytorch, "__version__") else "2.5.3",
            "torch": torch.__version__, "onnx": onnx.__version__, "sha256": sums}
    (OUT / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
