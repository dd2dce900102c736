"""Recipes that scale: a recipe in experiments/ is written for one training-set size, and this rule
adapts its batch size and learning rate to the size a run really has."""

from __future__ import annotations

import dataclasses

from pipeline.config import TrainConfig

# A recipe in experiments/ is written for the full set (45,000 training images). On a small set its
# batch leaves few optimizer steps per epoch (1,500 images at batch 512: 2), and the run learns
# nothing in the epochs a user gives it. The rule: at least MIN_STEPS_PER_EPOCH steps an epoch, the
# batch halved (to no less than MIN_BATCH) until there are, and the learning rate following the
# batch, linearly for SGD and by its square root for AdamW. Warm-up is a fraction of the steps, so
# it follows too. Measured in benchmarks/RESULTS.md (Recipes and training-set size).
MIN_STEPS_PER_EPOCH = 50
MIN_BATCH = 16


def scaled_to_data(config: TrainConfig, train_images: int) -> TrainConfig:
    """`config` with its recipe batch size and learning rate adapted to `train_images` (unchanged
    where the user gave either, or where the recipe already gives enough steps an epoch)."""
    if "batch_size" not in config.from_recipe:
        return dataclasses.replace(config, from_recipe=[])
    batch = config.batch_size
    while batch > MIN_BATCH and train_images // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    batch = max(batch, min(MIN_BATCH, config.batch_size))
    lr = config.lr
    if "lr" in config.from_recipe and batch != config.batch_size:
        ratio = batch / config.batch_size
        lr = config.lr * (ratio if config.optimizer == "sgd" else ratio**0.5)
    return dataclasses.replace(config, batch_size=batch, lr=lr, from_recipe=[])
