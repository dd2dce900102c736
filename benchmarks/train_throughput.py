"""Training images per second of every architecture through the one training loop.

Times `train_one_epoch` (forward, backward, optimizer step, on-device augmentation) after one warm-up
epoch, on synthetic 32x32 images, on the device training picks (CUDA when present), with the
model's default recipe from experiments/<model>.yaml.

    python benchmarks/train_throughput.py [--images 512] [--models cnn resnet18 ...] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from pipeline.config import resolve_train_config
from pipeline.models import model_names
from pipeline.train import make_optimizer, make_scheduler, prepare_training, train_one_epoch


def measure(name: str, images: int, batch_size: int, compile_model: bool) -> dict:
    config = resolve_train_config(
        {
            "model": name,
            "pretrained": False,
            "batch_size": batch_size,
            "data_dir": "synthetic",
            "max_train_images": images,
        }
    )
    prepared = prepare_training(config)
    model, batches, device = prepared.model, prepared.train_batches, prepared.device
    on_cuda = device.type == "cuda"
    step_model = torch.compile(model) if compile_model else model
    optimizer = make_optimizer(model, config, config.lr)
    scheduler = make_scheduler(optimizer, config, config.lr, 10 * len(batches))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    train_one_epoch(step_model, batches, optimizer, scheduler, loss_fn, epoch=0)
    if on_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    epochs = 3
    for epoch in range(1, epochs + 1):
        batches.set_epoch(epoch)
        train_one_epoch(step_model, batches, optimizer, scheduler, loss_fn, epoch)
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "model": name,
        "device": torch.cuda.get_device_name()
        if on_cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": batch_size,
        "images_per_second": round(epochs * batches.num_images / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", nargs="*", default=model_names())
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    for name in args.models:
        print(json.dumps(measure(name, args.images, args.batch_size, args.compile)), flush=True)


if __name__ == "__main__":
    main()
