"""Device-resident batches: the whole split lives on the training device as one uint8 tensor.

Normalization, random crop (zero padding), horizontal flip and cutout are done on whole batches with
tensor ops, so no PIL and no per-image Python runs in the training loop (the idea of
KellerJordan/cifar10-airbench). The random stream of an epoch depends only on (seed, epoch), which is
what makes a resumed run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model.architectures import normalize


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0


NO_AUGMENTATION = Augmentation(crop_padding=0, flip=False, cutout=0)


def random_crop(padded: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Crop each padded image at its own random offset with one gather, no Python loop."""
    n, _, height, width = padded.shape
    device = padded.device
    dy = torch.randint(0, height - size + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, width - size + 1, (n,), generator=generator, device=device)
    steps = torch.arange(size, device=device)
    rows = (dy[:, None] + steps)[:, :, None]
    cols = (dx[:, None] + steps)[:, None, :]
    batch = torch.arange(n, device=device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a `size` square (the mean after normalization) at a random centre of each image."""
    n, _, height, width = images.shape
    device = images.device
    top = torch.randint(0, height, (n, 1, 1), generator=generator, device=device) - size // 2
    left = torch.randint(0, width, (n, 1, 1), generator=generator, device=device) - size // 2
    ys = torch.arange(height, device=device)[None, :, None]
    xs = torch.arange(width, device=device)[None, None, :]
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images * (~inside)[:, None].to(images.dtype)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle, augmentation and dropout: a resumed run repeats an epoch
    exactly, and no two (seed, epoch) pairs of a run share a stream."""
    return seed * 100_003 + epoch


class DeviceBatches:
    """Iterates (images, labels) batches of a split held on `device`.

    `train=True` shuffles, augments and drops the last incomplete batch; otherwise batches come in
    order, unaugmented, and every image is seen once. With `shard=(rank, world_size)` a training
    split yields this process's share of each global batch (every `world_size`-th image of it,
    shuffled and augmented exactly as one process would), so that `world_size` processes together
    see what one process sees.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = False,
        augmentation: Augmentation = NO_AUGMENTATION,
        seed: int = 0,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.device = torch.device(device)
        nchw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.images = nchw.to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32).to(self.device)
        self.std = torch.tensor(std, dtype=torch.float32).to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augmentation = augmentation if train else NO_AUGMENTATION
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last
        pad = self.augmentation.crop_padding
        self.padded = torch.nn.functional.pad(self.images, (pad, pad, pad, pad)) if pad else None
        self.drop_last = train and len(self.labels) >= batch_size
        self.shard = shard if train else (0, 1)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        """Images one epoch yields to this process."""
        total = len(self) * self.batch_size if self.drop_last else len(self.labels)
        return total // self.shard[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        rank, world = self.shard
        for step in range(len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            batch = self.augment(index, generator)  # the whole batch: the same random draws
            yield batch[rank::world], self.labels[index][rank::world]

    def augment(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        aug = self.augmentation
        if self.padded is not None:
            batch = random_crop(self.padded[index], self.images.shape[-1], generator)
        else:
            batch = self.images[index]
        if aug.flip:
            batch = random_flip(batch, generator)
        batch = normalize(batch, self.mean, self.std)
        if aug.cutout:
            batch = random_cutout(batch, aug.cutout, generator)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
