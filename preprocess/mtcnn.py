"""A lean MTCNN (Zhang et al., 2016) over facenet-pytorch's shipped P-/R-/O-Net weights.

The geometry (pyramid, box regression, squaring, NMS, landmarks) is facenet-pytorch's `detect_face`,
written once here in numpy. The three networks run in a backend:

- `CvNets` (the CPU): OpenCV's DNN module, reading the ONNX files shipped in `preprocess/nets/`
  (made once by tools/export_mtcnn_onnx.py with `torch.onnx.export` from facenet-pytorch's own
  modules and weights; MIT, see nets/NOTICE.md). The crop stage then never imports torch, which
  costs 1.8 s per process on this project's CPU (see BENCHMARKS.md). onnxruntime runs these nets
  at the same speed (measured, BENCHMARKS.md §1) and would be one more dependency.
  Candidates are cut and resized with `cv2.resize(INTER_AREA)`, as the original MTCNN does.
- `mtcnn_torch.TorchNets` (CUDA): the same nets in torch, batches on the GPU, candidates cut for a
  whole batch with one `grid_sample` per image (bilinear at twice the size, then 2x2 average
  pooling, close to the area resize).

Why not facenet-pytorch's own `MTCNN.detect`: importing it imports torch and all of torchvision,
and its second and third stages cut every candidate box in a Python loop of `interpolate` calls.
Here only the `keep_rnet` / `keep_onet` best candidates per image go on to the next stage: a photo
has one subject and at most a few other faces (a bystander, a poster), not a crowd. Which candidate
is the subject is decided later, by `subject.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

NETS_DIR = Path(__file__).resolve().parent / "nets"
# Each net's outputs, in the order its forward returns them; "prob" ends in a softmax over (no face, face).
OUTPUTS = {"pnet": ["reg", "prob"], "rnet": ["reg", "prob"], "onet": ["reg", "landmarks", "prob"]}
SIDE = {"rnet": 24, "onet": 48}  # the input side of the second and third nets


def net_path(name: str) -> Path:
    """The shipped ONNX file of `name` ('pnet', 'rnet', 'onet'), made by tools/export_mtcnn_onnx.py
    from facenet-pytorch's own modules and weights."""
    path = NETS_DIR / f"{name}.onnx"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall maskcls (the MTCNN nets ship inside the package)")
    return path


# -- the detection geometry (numpy) -----------------------------------------------------------------

class Nets(Protocol):
    """A backend: runs the three nets on a batch of equal-size photos (N x H x W x 3 uint8)."""

    def load(self, images: np.ndarray): ...

    def pnet(self, batch, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The batch resized to `size` (h, w) → (regression N x 4 x h' x w', face probability N x h' x w')."""

    def rnet(self, batch, regions: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Regions (K x 4 ints: x0 y0 x1 y1) of images `idx`, at 24x24 → (regression K x 4, probability K)."""

    def onet(self, batch, regions: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The same at 48x48 → (regression K x 4, landmarks K x 10, probability K)."""


def detect_batch(nets: Nets, images: np.ndarray, min_face: int, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 keep_rnet: int = 16, keep_onet: int = 4) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """MTCNN over a batch of equal-size photos (N x H x W x 3 uint8) → per photo (boxes K x 4,
    scores K, landmarks K x 5 x 2), K >= 0, best first."""
    n, h, w = images.shape[:3]
    batch = nets.load(images)
    # Stage 1: P-Net over the pyramid, all images at once per scale.
    m = 12.0 / min_face
    scales, side = [], min(h, w) * m
    while side >= 12:
        scales.append(m * factor ** len(scales))
        side *= factor
    if not scales:  # the photo is smaller than the smallest face P-Net can see (12 px): nothing to find
        return [(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))) for _ in range(n)]
    cands, owners = [], []
    for s in scales:
        reg, prob = nets.pnet(batch, (int(h * s + 1), int(w * s + 1)))
        boxes, idx = _grid_boxes(reg, prob, s, thresholds[0])
        keep = nms(boxes[:, :4], boxes[:, 4], idx, 0.5)
        cands.append(boxes[keep])
        owners.append(idx[keep])
    boxes, idx = np.concatenate(cands), np.concatenate(owners)
    keep = nms(boxes[:, :4], boxes[:, 4], idx, 0.7)
    boxes, idx = boxes[keep], idx[keep]
    bw, bh = (boxes[:, 2] - boxes[:, 0])[:, None], (boxes[:, 3] - boxes[:, 1])[:, None]
    boxes = np.concatenate([boxes[:, :4] + boxes[:, 5:9] * np.concatenate([bw, bh, bw, bh], 1), boxes[:, 4:5]], 1)
    boxes, idx = _top_per_image(_square(boxes), idx, keep_rnet)
    # Stage 2: R-Net on 24x24 cuts.
    if len(boxes):
        reg, prob = nets.rnet(batch, _regions(boxes, w, h), idx)
        ok = prob > thresholds[1]
        boxes, idx, reg = np.concatenate([boxes[ok, :4], prob[ok, None]], 1), idx[ok], reg[ok]
        keep = nms(boxes[:, :4], boxes[:, 4], idx, 0.7)
        boxes, idx = _top_per_image(_square(_regress(boxes[keep], reg[keep])), idx[keep], keep_onet)
    # Stage 3: O-Net on 48x48 cuts, with landmarks.
    points = np.zeros((0, 5, 2), np.float32)
    if len(boxes):
        reg, lm, prob = nets.onet(batch, _regions(boxes, w, h), idx)
        ok = prob > thresholds[2]
        boxes, idx, reg, lm = np.concatenate([boxes[ok, :4], prob[ok, None]], 1), idx[ok], reg[ok], lm[ok]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = np.stack([bw * lm[:, :5] + boxes[:, :1] - 1, bh * lm[:, 5:] + boxes[:, 1:2] - 1], 2)
        boxes = _regress(boxes, reg)
        keep = nms(boxes[:, :4], boxes[:, 4], idx, 0.7, "min")
        boxes, idx, points = boxes[keep], idx[keep], points[keep]
    out = []
    for b in range(n):
        sel = np.nonzero(idx == b)[0]
        out.append((boxes[sel, :4].astype(np.float64), boxes[sel, 4].astype(np.float64), points[sel].astype(np.float64)))
    return out


def _grid_boxes(reg: np.ndarray, prob: np.ndarray, scale: float, thresh: float):
    """P-Net's output cells above `thresh` as boxes [x1 y1 x2 y2 score reg4] in the input's pixels, and their image."""
    img, yy, xx = np.nonzero(prob >= thresh)
    score = prob[img, yy, xx]
    r = reg[img, :, yy, xx]
    bb = np.stack([xx, yy], 1).astype(np.float32)
    q1, q2 = np.floor((2 * bb + 1) / scale), np.floor((2 * bb + 12) / scale)
    return np.concatenate([q1, q2, score[:, None], r], 1).astype(np.float32), img


def _square(boxes):
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x1, y1 = boxes[:, 0] + w * 0.5 - side * 0.5, boxes[:, 1] + h * 0.5 - side * 0.5
    return np.concatenate([np.stack([x1, y1, x1 + side, y1 + side], 1), boxes[:, 4:]], 1)


def _regress(boxes, reg):
    w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    return np.concatenate([boxes[:, :4] + reg[:, :4] * np.concatenate([w, h, w, h], 1), boxes[:, 4:]], 1)


def _top_per_image(boxes, idx, k: int):
    """At most the k best-scoring boxes of each image."""
    order = np.argsort(-boxes[:, 4], kind="stable")
    order = order[np.argsort(idx[order], kind="stable")]  # by image, best first within each
    sidx = idx[order]
    first = np.searchsorted(sidx, sidx, side="left")
    order = order[np.arange(len(order)) - first < k]
    order = order[np.argsort(-boxes[order, 4], kind="stable")]
    return boxes[order], idx[order]


def _regions(boxes, w: int, h: int) -> np.ndarray:
    """The integer pixel region (x0, y0, x1, y1; end exclusive) each box cuts from its image: the box
    truncated and clipped to the image, as facenet-pytorch's `pad` does, never empty."""
    b = np.trunc(boxes[:, :4])
    x0, y0 = np.maximum(b[:, 0], 1) - 1, np.maximum(b[:, 1], 1) - 1
    x1, y1 = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    x0, y0 = np.minimum(x0, w - 1), np.minimum(y0, h - 1)
    return np.stack([x0, y0, np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)], 1).astype(np.int64)


def nms(boxes, scores, idx, thresh: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression within each image (boxes of different `idx` never suppress each other).
    Overlap counts pixels inclusively (+1), as facenet-pytorch does; 'union' is IoU (OpenCV's batched NMS,
    given widths + 1, computes exactly that, ~3x faster than the loop below), 'min' divides by the smaller box."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    if mode == "union":
        b = np.asarray(boxes, np.float64)
        rects = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1], 1)
        keep = cv2.dnn.NMSBoxesBatched(rects.tolist(), np.asarray(scores, np.float64).tolist(),
                                       np.asarray(idx).tolist(), -np.inf, thresh)
        return np.asarray(keep, np.int64).reshape(-1)
    b = boxes.astype(np.float64) + idx.astype(np.float64)[:, None] * (float(boxes.max()) + 1)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")
    keep = []
    while order.size:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= thresh]
    return np.array(keep, dtype=np.int64)


# -- the CPU backend: OpenCV DNN ---------------------------------------------------------------------

_INPUT_LUT = (np.arange(256, dtype=np.float32) - 127.5) * np.float32(0.0078125)  # uint8 pixel -> the nets' input

class CvNets:
    """The three nets in OpenCV's DNN module, on the CPU, without torch."""

    def __init__(self, max_batch: int = 64):
        self._nets = {name: cv2.dnn.readNetFromONNX(str(net_path(name))) for name in OUTPUTS}
        self.max_batch = max_batch

    def load(self, images: np.ndarray) -> list[np.ndarray]:
        """Each photo as the nets' input, (pixel - 127.5) / 128 in float32, by a 256-entry table: the same
        values as the arithmetic (exact in float32: 8 significant bits over a power of two), at a twelfth of
        its time (0.06 against 0.8 ms for a 192 x 256 photo, measured; BENCHMARKS §25)."""
        return [cv2.LUT(img, _INPUT_LUT) for img in images]

    def pnet(self, batch, size):
        h, w = size
        x = np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in batch])
        reg, prob = self._forward("pnet", x.transpose(0, 3, 1, 2))
        return reg, prob[:, 1]

    def rnet(self, batch, regions, idx):
        reg, prob = self._forward("rnet", _cut(batch, regions, idx, SIDE["rnet"]))
        return reg, prob[:, 1]

    def onet(self, batch, regions, idx):
        reg, lm, prob = self._forward("onet", _cut(batch, regions, idx, SIDE["onet"]))
        return reg, lm, prob[:, 1]

    def _forward(self, name: str, x: np.ndarray):
        """The net on x (N x 3 x H x W) in chunks of at most `max_batch`. Unlike torch's oneDNN, OpenCV
        neither slows down nor grows when the batch size changes from call to call (measured), so
        batches are not padded to fixed sizes."""
        net, outs = self._nets[name], OUTPUTS[name]
        parts = []
        for start in range(0, len(x), self.max_batch):
            net.setInput(np.ascontiguousarray(x[start:start + self.max_batch], dtype=np.float32))
            parts.append([np.asarray(o) for o in net.forward(outs)])
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(outs)))


def _cut(batch: list[np.ndarray], regions: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
    """Each region of its image, area-resized to size x size → K x 3 x size x size."""
    out = np.empty((len(regions), size, size, 3), np.float32)
    for k, ((x0, y0, x1, y1), b) in enumerate(zip(regions.tolist(), idx.tolist())):
        out[k] = cv2.resize(batch[b][y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    return out.transpose(0, 3, 1, 2)
