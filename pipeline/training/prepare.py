"""What a training run trains on: data, splits, device-resident batches and a seeded model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError, TrainConfig
from pipeline.data.image_set import ImageSet
from pipeline.data.sources import Splits, load_training_set, make_splits
from pipeline.model.architectures import build_model, get_spec, normalize
from pipeline.training.distributed import current_worker, join_group, worker_device
from pipeline.training.loader import Augmentation, DeviceBatches
from pipeline.training.precision import select_device
from pipeline.training.recipes import scaled_to_data


@dataclass
class Prepared:
    config: TrainConfig  # what really runs: the recipe scaled to the training-set size
    splits: Splits
    model: nn.Module
    train_batches: DeviceBatches
    val_batches: DeviceBatches
    device: torch.device
    data: ImageSet


def prepare_training(config: TrainConfig, data: ImageSet | None = None) -> Prepared:
    """Data, splits, device-resident batches and a freshly seeded model for `config`, whose
    recipe batch size and learning rate are first scaled to the training split (`Prepared.config`).

    `data` lets a caller that trains many times (tuning) load the training batches once. Under
    torchrun the process joins its group, takes its device (its GPU) and its shard of each batch.
    """
    if data is None:
        data = load_training_set(config.data_dir, config.download, config.skip_bad_images)
    splits = make_splits(data, config.val_fraction, config.seed, config.max_train_images)
    config = scaled_to_data(config, len(splits.train))
    device = select_device()
    shard = (0, 1)
    worker = current_worker()
    if worker is not None:
        if len(splits.train) < config.batch_size:
            raise ConfigError(
                f"{len(splits.train)} training images are fewer than one global batch of "
                f"{config.batch_size}; train on one process, or on more images."
            )
        device = worker_device(worker, device)
        join_group(device, config.collective_timeout_s)
        shard = (worker.rank, worker.world_size)
    on_cuda = device.type == "cuda"
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        config.options,
        pretrained=config.pretrained,
        weights_path=config.weights_path,
        num_classes=len(data.class_names),
    )
    if (init_from_data := get_spec(config.model).init_from_data) is not None:
        sample = torch.from_numpy(splits.train.images[:5000]).permute(0, 3, 1, 2)
        init_from_data(model, normalize(sample, splits.mean, splits.std))
    if worker is not None and on_cuda and config.sync_batch_norm:
        # SyncBatchNorm runs on CUDA only; on CPUs each process normalizes over its shard.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # channels_last on every device: on CPUs too it is never slower and up to 1.5x faster, float32
    # and bfloat16, AVX2 and AVX-512 kernels alike (benchmarks/RESULTS.md, "channels_last on the CPU").
    model = model.to(device).to(memory_format=torch.channels_last)
    augmentation = Augmentation(config.crop_padding, config.flip, config.cutout)
    common = {"mean": splits.mean, "std": splits.std, "device": device, "channels_last": True}
    train_batches = DeviceBatches(
        splits.train.images,
        splits.train.labels,
        batch_size=config.batch_size,
        train=True,
        augmentation=augmentation,
        seed=config.seed,
        shard=shard,
        **common,
    )
    val_batches = DeviceBatches(
        splits.val.images, splits.val.labels, batch_size=config.eval_batch_size, **common
    )
    return Prepared(config, splits, model, train_batches, val_batches, device, data)
