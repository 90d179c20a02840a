"""The on-device data pipeline (the airbench pattern): the whole uint8 dataset lives on the
training device, and each batch is gathered, randomly cropped with zero padding, flipped,
normalised and optionally cut out by a handful of batched tensor ops. No per-image Python
work, no worker processes.

Determinism: the order and every augmentation decision of epoch ``e`` come from a CPU
generator seeded with ``(seed, e)`` alone, drawn for the whole (padded) epoch and then
sharded, so a run is reproducible on any device, resuming at an epoch boundary replays the
same batches, and in DDP each rank sees a disjoint shard of one global order (the
``DistributedSampler`` convention: the order is padded to a multiple of the world size).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in 0..1 units) of a uint8 ``[N, C, H, W]`` tensor, computed in
    chunks in float64 so that no full float copy of the dataset is made."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64, device=images.device)
    s2 = torch.zeros_like(s)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2 ** 63))
    return g


class GpuLoader:
    """Batches from a uint8 dataset held on ``device``.

    Args:
        images: uint8 ``[N, C, H, W]`` (numpy array or tensor); moved to ``device`` once.
        labels: int ``[N]``.
        batch_size: images per batch *on this rank*.
        train: shuffle + augment + drop the last partial batch (True), or the fixed order
            without augmentation (False, for evaluation; each rank gets ``index % world == rank``).
        mean, std: per-channel normalisation in 0..1 units.
        crop_padding: random crop with this much zero padding (0 disables).
        flip: random horizontal flip.
        cutout: side of the square zeroed at a random centre (DeVries & Taylor), 0 disables.
        out_size: (H, W) the model expects; inputs up to 8 px smaller are zero-padded once
            (MNIST 28 -> 32, as LeNet-5 did), any other size is resized bilinearly per batch.
        channels_last: hand out channels-last batches.
    """

    def __init__(self, images, labels, batch_size: int, *, train: bool, device="cpu",
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), crop_padding: int = 0,
                 flip: bool = False, cutout: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 out_size: tuple[int, int] | None = None, channels_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        device = torch.device(device)
        images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        h, w = images.shape[2:]
        self.resize_to = None
        if out_size is not None and tuple(out_size) != (h, w):
            oh, ow = out_size
            if 0 <= oh - h <= 8 and 0 <= ow - w <= 8:
                top, left = (oh - h) // 2, (ow - w) // 2
                images = F.pad(images, (left, ow - w - left, top, oh - h - top))
            else:
                self.resize_to = (int(oh), int(ow))
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device=device, dtype=torch.long)
        self.device = device
        self.batch_size = int(batch_size)
        self.train = bool(train)
        c = self.images.shape[1]
        mean, std = list(mean), list(std)
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
        # x_norm = (x/255 - mean)/std = x * scale + shift
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, c, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, c, 1, 1)
        self.crop_padding = int(crop_padding) if train else 0
        self.flip = bool(flip) and train
        self.cutout = int(cutout) if train else 0
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.channels_last = bool(channels_last)
        self.epoch = 0

    # ------------------------------------------------------------------ sizes
    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch (before dropping the last partial batch)."""
        n = self.images.shape[0]
        if self.train:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ iteration
    def _plan(self):
        """Indices and augmentation parameters for this rank's share of the epoch (CPU)."""
        n = self.images.shape[0]
        if not self.train:
            return torch.arange(self.rank, n, self.world_size), None
        g = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=g)
        total = math.ceil(n / self.world_size) * self.world_size
        if total > n:  # pad by repeating the start, as DistributedSampler does
            order = torch.cat([order, order[: total - n]])
        p = self.crop_padding
        h, w = self.images.shape[2:]
        aug = {
            "dy": torch.randint(0, 2 * p + 1, (total,), generator=g),
            "dx": torch.randint(0, 2 * p + 1, (total,), generator=g),
            "flip": torch.rand(total, generator=g) < 0.5,
            "cy": torch.randint(0, h, (total,), generator=g),
            "cx": torch.randint(0, w, (total,), generator=g),
        }
        sl = slice(self.rank, total, self.world_size)
        return order[sl], {k: v[sl] for k, v in aug.items()}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, aug = self._plan()
        nb = len(self)
        idx = idx.to(self.device)
        if aug is not None:
            aug = {k: v.to(self.device) for k, v in aug.items()}
        for b in range(nb):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            bi = idx[sl]
            x = self.images[bi]
            if aug is not None:
                x = self._augment_uint8(x, {k: v[sl] for k, v in aug.items()})
            x = x.to(torch.float32) * self.scale + self.shift
            if aug is not None and self.cutout > 0:
                x = self._cutout(x, aug["cy"][sl], aug["cx"][sl])
            if self.resize_to is not None:
                x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[bi]

    def _augment_uint8(self, x: torch.Tensor, a: dict) -> torch.Tensor:
        p = self.crop_padding
        bsz, _, h, w = x.shape
        if p > 0:
            c = x.shape[1]
            wp = w + 2 * p
            padded = F.pad(x, (p, p, p, p)).view(bsz, c, (h + 2 * p) * wp)
            rows = (a["dy"][:, None] + torch.arange(h, device=x.device))[:, :, None]  # B,H,1
            cols = (a["dx"][:, None] + torch.arange(w, device=x.device))[:, None, :]  # B,1,W
            flat = (rows * wp + cols).view(bsz, 1, h * w).expand(bsz, c, h * w)
            x = padded.gather(2, flat).view(bsz, c, h, w)  # one gather: the crop of every image
        if self.flip:
            x = torch.where(a["flip"][:, None, None, None], x.flip(3), x)
        return x.contiguous()

    def _cutout(self, x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        half = self.cutout // 2
        r = torch.arange(h, device=x.device)[None, :, None]
        c = torch.arange(w, device=x.device)[None, None, :]
        y0, x0 = (cy - half)[:, None, None], (cx - half)[:, None, None]
        inside = (r >= y0) & (r < y0 + self.cutout) & (c >= x0) & (c < x0 + self.cutout)
        return x.masked_fill(inside[:, None], 0.0)
