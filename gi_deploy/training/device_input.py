"""What a training batch becomes on its way into the model. On the CPU (and with colour jitter) the
loader's workers augment and normalise, as they always did. On CUDA the workers only decode and
resize: uint8 pixels travel to the GPU (a quarter of the float32 bytes, through pinned memory), and
the random flips and rotation, then the normalisation, run there on the whole batch, with a draw
per image from the CUDA generator (which checkpoints save and restore, so a resumed run sees the
same augmentations)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.training.data import Augment


def augments_on_device(device: torch.device, augment: Augment) -> bool:
    """Whether a run on ``device`` augments on it: CUDA, and no colour jitter (which stays with
    torchvision on the CPU, where its hue and saturation maths are the reference)."""
    return device.type == "cuda" and augment.color_jitter == 0


class DeviceFeed:
    """``feed(x, train)``: the model's input (float32 NCHW, normalised, channels-last when asked)
    from a loader batch: float NCHW from CPU workers, or uint8 NHWC pixels with ``on_device``."""

    def __init__(
        self, spec: PreprocessSpec, device: torch.device, channels_last: bool, augment: Augment, on_device: bool
    ):
        self.device, self.channels_last, self.augment, self.on_device = device, channels_last, augment, on_device
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.on_device:
            x = x.permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW float in [0, 255]
            if train:
                x = self._augment(x)
            x = (x * (1.0 / 255.0) - self.mean) / self.std  # the float ops of preprocess.normalize
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Per image: horizontal / vertical flip with p=0.5 and a rotation in ±degrees (bilinear,
        black outside, about the centre), as Augment does on the CPU."""
        n = len(x)
        a = self.augment
        if a.hflip:
            x = torch.where((torch.rand(n, device=x.device) < 0.5).view(n, 1, 1, 1), x.flip(3), x)
        if a.vflip:
            x = torch.where((torch.rand(n, device=x.device) < 0.5).view(n, 1, 1, 1), x.flip(2), x)
        if a.rotation_degrees > 0:
            angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(a.rotation_degrees)
            h, w = x.shape[-2:]
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack(
                [
                    torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], 1),
                    torch.stack([sin * w / h, cos, torch.zeros_like(cos)], 1),
                ],
                1,
            )
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x
