"""MTCNN's three nets in torch, for CUDA: a batch of photos stays on the GPU through all three stages.

The nets are facenet-pytorch's own modules (`PNet`, `RNet`, `ONet`, with their shipped weights), the
same ones tools/export_mtcnn_onnx.py exports for the CPU engine, so the two engines cannot drift apart.
The geometry between the stages is `mtcnn.detect_batch` (numpy, on a few hundred boxes); only the
pixels live here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

from .mtcnn import SIDE


class TorchNets:
    """The `mtcnn.Nets` backend on a torch device (meant for CUDA; runs on the CPU too, for tests)."""

    def __init__(self, device: torch.device, bucket: int = 64):
        self.device, self.bucket = torch.device(device), bucket
        # channels_last: torch's CPU max-pooling is ~10x faster in it, and convolutions no slower.
        self.nets = {name: cls().eval().to(self.device, memory_format=torch.channels_last)
                     for name, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet))}

    @torch.inference_mode()
    def load(self, images: np.ndarray) -> torch.Tensor:
        imgs = torch.as_tensor(images, device=self.device).permute(0, 3, 1, 2).float()
        return (imgs - 127.5) * 0.0078125

    @torch.inference_mode()
    def pnet(self, batch, size):
        x = F.interpolate(batch, size=size, mode="area").contiguous(memory_format=torch.channels_last)
        reg, prob = self.nets["pnet"](x)
        return reg.float().cpu().numpy(), prob[:, 1].float().cpu().numpy()

    @torch.inference_mode()
    def rnet(self, batch, regions, idx):
        reg, prob = self._bucketed("rnet", _cut(batch, regions, idx, SIDE["rnet"]))
        return reg, prob[:, 1]

    @torch.inference_mode()
    def onet(self, batch, regions, idx):
        reg, lm, prob = self._bucketed("onet", _cut(batch, regions, idx, SIDE["onet"]))
        return reg, lm, prob[:, 1]

    def _bucketed(self, name: str, x: torch.Tensor) -> list[np.ndarray]:
        """The net on x with the batch padded to a multiple of `bucket`: every new input shape makes
        cuDNN/oneDNN plan and cache another kernel (measured on the CPU: +440 MiB over 1,000 photos)."""
        n = x.shape[0]
        pad = (-n) % self.bucket
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        out = self.nets[name](x.contiguous(memory_format=torch.channels_last))
        return [v[:n].float().cpu().numpy() for v in out]


def _cut(norm: torch.Tensor, regions: np.ndarray, idx: np.ndarray, size: int) -> torch.Tensor:
    """Each region of its image resized to size x size: bilinear at 2x, then 2x2 average pooling
    (one grid_sample per image for all its candidates, instead of a kernel launch per box)."""
    _, c, h, w = norm.shape
    r = torch.as_tensor(regions, device=norm.device, dtype=norm.dtype)
    idx_t = torch.as_tensor(idx, device=norm.device)
    x0, y0, x1, y1 = r.unbind(1)
    s2 = 2 * size
    t = (torch.arange(s2, device=norm.device, dtype=norm.dtype) + 0.5) / s2
    gx = ((x0[:, None] + t[None] * (x1 - x0)[:, None]) / w) * 2 - 1   # K x s2, align_corners=False
    gy = ((y0[:, None] + t[None] * (y1 - y0)[:, None]) / h) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, s2, -1), gy[:, :, None].expand(-1, -1, s2)], 3)  # K x s2 x s2 x 2
    out = torch.empty(len(r), c, s2, s2, device=norm.device, dtype=norm.dtype)
    for b in np.unique(idx).tolist():
        sel = (idx_t == b).nonzero()[:, 0]
        g = grid[sel].reshape(1, len(sel) * s2, s2, 2)
        cut = F.grid_sample(norm[b:b + 1], g, mode="bilinear", padding_mode="border", align_corners=False)
        out[sel] = cut.reshape(c, len(sel), s2, s2).permute(1, 0, 2, 3)
    return F.avg_pool2d(out, 2)
