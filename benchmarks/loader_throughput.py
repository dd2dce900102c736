"""Images per second for one augmented training epoch: device-resident loader vs DataLoader + PIL.

Both apply the same augmentation (random crop with 4 px zero padding, horizontal flip, normalize) to
the real subset and yield normalized float batches of 128; no model runs, so this is the data path
alone. The torchvision side uses 2 worker processes, as a typical tutorial would.

    python benchmarks/loader_throughput.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pipeline.data.sources import channel_stats, load_training_set
from pipeline.training.loader import Augmentation, DeviceBatches

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"


class PilDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def images_per_second(batches, epochs: int) -> float:
    count, started = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _labels in batches:
            count += len(images)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=Path, default=SUBSET)
    args = parser.parse_args()
    data = load_training_set(args.subset, download=False)
    mean, std = channel_stats(data.images)
    device_batches = DeviceBatches(
        data.images,
        data.labels,
        mean,
        std,
        batch_size=128,
        train=True,
        augmentation=Augmentation(4, True, 0),
    )
    pil = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = DataLoader(
        PilDataset(data.images, data.labels, pil), batch_size=128, shuffle=True, drop_last=True,
        num_workers=2, persistent_workers=True,
    )  # fmt: skip
    images_per_second(loader, 1)  # start the workers before timing
    device = images_per_second(device_batches, args.epochs)
    baseline = images_per_second(loader, args.epochs)
    print(
        json.dumps(
            {
                "images": len(data),
                "torch_threads": torch.get_num_threads(),
                "device_loader_images_per_second": round(device),
                "dataloader_pil_2_workers_images_per_second": round(baseline),
                "speedup": round(device / baseline, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
