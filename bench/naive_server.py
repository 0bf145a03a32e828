"""The baseline of bench/serve.py: a handler written the way the community apps of this competition
serve a model (FastAPI; per request: decode, facenet-pytorch's MTCNN() with its defaults on the full
photo, the face (or the whole photo) resized, a hard-coded ImageNet mean and std, the torch model in
eager mode, one photo at a time).

    python bench/naive_server.py CKPT PORT
"""
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from facenet_pytorch import MTCNN  # noqa: E402
from fastapi import FastAPI, File, UploadFile  # noqa: E402
from PIL import Image  # noqa: E402

from classify.checkpoint import load_checkpoint  # noqa: E402
from classify.inference.torch_backend import load_model  # noqa: E402

ckpt = load_checkpoint(sys.argv[1])
model = load_model(ckpt, torch.device("cpu"))
size = ckpt["card"]["img_size"]  # the model card (checkpoint format 2)
mtcnn = MTCNN(device="cpu")
mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    img = Image.open(io.BytesIO(await file.read())).convert("RGB")
    boxes, _ = mtcnn.detect(img)
    if boxes is not None and len(boxes):
        x1, y1, x2, y2 = np.asarray(boxes[0], dtype=float)
        img = img.crop((x1, y1, x2, y2))
    x = torch.from_numpy(np.asarray(img.resize((size, size)), dtype=np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        p = model(((x - mean) / std)[None])["label"].softmax(-1)[0]
    return {"class": int(p.argmax()), "probs": p.tolist()}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
