"""A lean MTCNN (Zhang et al., 2016) over facenet-pytorch's shipped P-/R-/O-Net weights.

Why not facenet-pytorch's own `MTCNN.detect`: importing it imports all of torchvision (about 1.5 s
per process on this project's CPU), and its second and third stages cut and resize every candidate
box in a Python loop (thousands of small `interpolate` calls per batch). Here:

- the three networks are the same layers, loaded from the same weight files (no torchvision import);
- the candidates of a whole batch are cut and resized with one `grid_sample` per image and stage
  (bilinear at twice the size, then 2x2 average pooling, close to the "area" resize of the original);
- only the `keep_rnet` / `keep_onet` best candidates per image go on to the next stage: we want the
  one main face of a photo, not every face in a crowd.

The geometry (pyramid, box regression, squaring, clipping, NMS thresholds, landmarks) follows
facenet-pytorch's `detect_face`, so boxes agree with it to a few pixels.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _weights(name: str) -> dict:
    spec = importlib.util.find_spec("facenet_pytorch")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise RuntimeError("facenet-pytorch is not installed: pip install facenet-pytorch==2.5.3")
    path = os.path.join(os.path.dirname(spec.origin), "data", f"{name}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)
        self.load_state_dict(_weights("pnet"))

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.conv4_1(x).softmax(1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)
        self.load_state_dict(_weights("rnet"))

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).flatten(1)  # the weights' (Caffe) layout
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), self.dense5_1(x).softmax(1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)
        self.load_state_dict(_weights("onet"))

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(1)


class LeanMTCNN(nn.Module):
    """`detect(batch uint8 N x H x W x 3)` → per image (boxes K x 4, scores K, landmarks K x 5 x 2) as numpy,
    K >= 0, best first by score."""

    def __init__(self, device: torch.device, keep_rnet: int = 32, keep_onet: int = 8):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.keep_rnet, self.keep_onet = keep_rnet, keep_onet
        self.device = device
        # channels_last: torch's CPU max-pooling is ~10x faster in it (measured), and convolutions no slower.
        self.to(device).to(memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def detect(self, images: np.ndarray, min_face: int, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        n = len(images)
        pad = (1 << (n - 1).bit_length()) - n  # batch sizes of powers of two: few shapes for oneDNN to cache
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        imgs = torch.as_tensor(images, device=self.device).permute(0, 3, 1, 2).float()
        _, _, h, w = imgs.shape
        norm = (imgs - 127.5) * 0.0078125
        # Stage 1: P-Net over the pyramid, all images at once per scale.
        m = 12.0 / min_face
        scales, side = [], min(h, w) * m
        while side >= 12:
            scales.append(m * factor ** len(scales))
            side *= factor
        cands, owners = [], []
        for s in scales:
            x = F.interpolate(imgs, size=(int(h * s + 1), int(w * s + 1)), mode="area")
            reg, prob = self.pnet(((x - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last))
            boxes, idx = _grid_boxes(reg, prob[:, 1], s, thresholds[0])
            keep = _nms(boxes[:, :4], boxes[:, 4], idx, 0.5)
            cands.append(boxes[keep])
            owners.append(idx[keep])
        boxes, idx = torch.cat(cands), torch.cat(owners)
        keep = _nms(boxes[:, :4], boxes[:, 4], idx, 0.7)
        boxes, idx = boxes[keep], idx[keep]
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                             boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], 1)
        boxes, idx = _top_per_image(_square(boxes), idx, self.keep_rnet)
        # Stage 2: R-Net on 24x24 cuts.
        if len(boxes):
            reg, prob = _run_bucketed(self.rnet, _cut(norm, boxes, idx, 24))
            ok = prob[:, 1] > thresholds[1]
            boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], 1)
            idx, reg = idx[ok], reg[ok]
            keep = _nms(boxes[:, :4], boxes[:, 4], idx, 0.7)
            boxes, idx = _top_per_image(_square(_regress(boxes[keep], reg[keep])), idx[keep], self.keep_onet)
        # Stage 3: O-Net on 48x48 cuts, with landmarks.
        points = torch.zeros(0, 5, 2, device=self.device)
        if len(boxes):
            reg, lm, prob = _run_bucketed(self.onet, _cut(norm, boxes, idx, 48))
            ok = prob[:, 1] > thresholds[2]
            boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], 1)
            idx, reg, lm = idx[ok], reg[ok], lm[ok]
            bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            points = torch.stack([bw * lm[:, :5] + boxes[:, :1] - 1, bh * lm[:, 5:] + boxes[:, 1:2] - 1], 2)
            boxes = _regress(boxes, reg)
            keep = _nms(boxes[:, :4], boxes[:, 4], idx, 0.7, "min")
            boxes, idx, points = boxes[keep], idx[keep], points[keep]
        boxes, idx, points = boxes.cpu().numpy(), idx.cpu().numpy(), points.cpu().numpy()
        out = []
        for b in range(n):
            sel = np.nonzero(idx == b)[0]
            out.append((boxes[sel, :4].astype(np.float64), boxes[sel, 4].astype(np.float64),
                        points[sel].astype(np.float64)))
        return out


def _run_bucketed(net, x, bucket: int = 64):
    """net(x) with the batch padded to a multiple of `bucket`. The number of candidates changes with
    every batch, and each new input shape makes oneDNN compile and cache another kernel: memory
    grew with the number of photos (measured: +440 MiB over 1,000 photos) until shapes were bucketed."""
    n = x.shape[0]
    pad = (-n) % bucket
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    out = net(x.contiguous(memory_format=torch.channels_last))
    return tuple(o[:n] for o in out)


def _grid_boxes(reg, prob, scale: float, thresh: float):
    """P-Net's output cells above `thresh` as boxes [x1 y1 x2 y2 score reg4] in the input's pixels."""
    mask = prob >= thresh
    where = mask.nonzero()
    score = prob[mask]
    reg = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    bb = where[:, 1:].to(reg.dtype).flip(1)
    q1 = ((2 * bb + 1) / scale).floor()
    q2 = ((2 * bb + 12) / scale).floor()
    return torch.cat([q1, q2, score[:, None], reg], 1), where[:, 0]


def _square(boxes):
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1, y1 = boxes[:, 0] + w * 0.5 - side * 0.5, boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], 1), boxes[:, 4:]], 1)


def _regress(boxes, reg):
    w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    delta = torch.cat([reg[:, 0:1] * w, reg[:, 1:2] * h, reg[:, 2:3] * w, reg[:, 3:4] * h], 1)
    return torch.cat([boxes[:, :4] + delta, boxes[:, 4:]], 1)


def _top_per_image(boxes, idx, k: int):
    if len(boxes) == 0:
        return boxes, idx
    order = torch.argsort(boxes[:, 4], descending=True, stable=True)
    boxes, idx = boxes[order], idx[order]
    rank = torch.zeros_like(idx)
    for b in torch.unique(idx):  # few images per batch: a loop over images, not boxes
        sel = (idx == b).nonzero()[:, 0]
        rank[sel] = torch.arange(len(sel), device=idx.device)
    keep = rank < k
    return boxes[keep], idx[keep]


def _cut(norm, boxes, idx, size: int):
    """Cut each box (clipped to its image, as facenet-pytorch does) out of its normalised image and
    resize it to size x size: bilinear at 2x, then 2x2 average pooling."""
    _, c, h, w = norm.shape
    b = boxes[:, :4].trunc()
    x0 = (b[:, 0].clamp(min=1) - 1)
    y0 = (b[:, 1].clamp(min=1) - 1)
    x1 = b[:, 2].clamp(max=w)
    y1 = b[:, 3].clamp(max=h)
    x1, y1 = torch.maximum(x1, x0 + 1), torch.maximum(y1, y0 + 1)
    s2 = 2 * size
    t = (torch.arange(s2, device=norm.device, dtype=norm.dtype) + 0.5) / s2
    gx = ((x0[:, None] + t[None] * (x1 - x0)[:, None]) / w) * 2 - 1   # K x s2, align_corners=False
    gy = ((y0[:, None] + t[None] * (y1 - y0)[:, None]) / h) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, s2, -1), gy[:, :, None].expand(-1, -1, s2)], 3)  # K x s2 x s2 x 2
    out = torch.empty(len(boxes), c, s2, s2, device=norm.device, dtype=norm.dtype)
    for b_i in torch.unique(idx).tolist():
        sel = (idx == b_i).nonzero()[:, 0]
        g = grid[sel].reshape(1, len(sel) * s2, s2, 2)
        cut = F.grid_sample(norm[b_i:b_i + 1], g, mode="bilinear", padding_mode="border", align_corners=False)
        out[sel] = cut.reshape(c, len(sel), s2, s2).permute(1, 0, 2, 3)
    return F.avg_pool2d(out, 2)


def _nms(boxes, scores, idx, thresh: float, mode: str = "union"):
    """Greedy non-maximum suppression within each image (boxes of different `idx` never suppress each other)."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    off = idx.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    b = (boxes + off).cpu().numpy().astype(np.float64)
    s = scores.cpu().numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s, kind="stable")
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
    return torch.as_tensor(np.array(keep, dtype=np.int64), device=boxes.device)
