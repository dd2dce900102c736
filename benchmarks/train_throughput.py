"""Training images per second of every architecture, through `fit()` itself: what users run.

Each model trains with its recipe from experiments/<model>.yaml on synthetic 32x32 images, on the
device training picks (CUDA when present); `fit()` reports `images_per_second` for every epoch (the
training pass alone, validation excluded). The first epoch is a warm-up and is not counted.
Fine-tuned models freeze their features for the first half of the epochs and are reported per phase,
so the frozen phase really is frozen (only the head trains) as in a real run.

    python benchmarks/train_throughput.py [--images 512] [--epochs 4] [--models cnn resnet18 ...]
        [--precision auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import json

import torch

from pipeline.config import PRECISIONS, resolve_train_config
from pipeline.data.sources import make_synthetic
from pipeline.model.architectures import get_spec, model_names
from pipeline.training.loop import fit
from pipeline.training.precision import autocast_dtype
from pipeline.training.prepare import prepare_training


def measure(
    name: str, images: int, batch_size: int, epochs: int, compile_model: bool, precision: str
) -> dict:
    config = resolve_train_config(
        {
            "model": name,
            "pretrained": False,
            "batch_size": batch_size,
            "epochs": epochs,
            "freeze_epochs": epochs // 2,
            "compile": compile_model,
            "precision": precision,
            "val_fraction": 0.1,
        }
    )
    prepared = prepare_training(config, make_synthetic(int(images / 0.9) + 10, seed=0))
    state = fit(
        prepared.model,
        prepared.train_batches,
        prepared.val_batches,
        config,
    )
    speeds = [epoch["images_per_second"] for epoch in state.history]
    phases = {"all": speeds[1:]}
    if get_spec(name).unfreeze_after_freeze_epochs:
        phases = {"frozen": speeds[1 : epochs // 2], "unfrozen": speeds[epochs // 2 + 1 :]}
    on_cuda = prepared.device.type == "cuda"
    return {
        "model": name,
        "device": torch.cuda.get_device_name()
        if on_cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": batch_size,
        "train_images": len(prepared.splits.train),
        "compile": compile_model,
        "precision": "bf16" if autocast_dtype(prepared.device, precision) else "fp32",
        **{
            f"images_per_second_{phase}": round(sum(values) / len(values), 1)
            for phase, values in phases.items()
            if values
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", nargs="*", default=model_names())
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    args = parser.parse_args()
    for name in args.models:
        result = measure(
            name, args.images, args.batch_size, args.epochs, args.compile, args.precision
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
