import numpy as np
import torch

from pipeline.data.sources import channel_stats, make_synthetic
from pipeline.training.loader import Augmentation, DeviceBatches, random_crop, random_cutout

IMAGES = make_synthetic(64, seed=0)
MEAN, STD = channel_stats(IMAGES.images)


def batches(**kwargs) -> DeviceBatches:
    options = {"batch_size": 16, "mean": MEAN, "std": STD} | kwargs
    return DeviceBatches(IMAGES.images, IMAGES.labels, **options)


def test_eval_batches_cover_every_image_once_in_order_normalized():
    loader = batches(batch_size=20)
    images, labels = zip(*loader, strict=True)
    assert [len(x) for x in labels] == [20, 20, 20, 4]
    assert torch.equal(torch.cat(labels), torch.from_numpy(IMAGES.labels))
    stacked = torch.cat(images)
    assert stacked.shape == (64, 3, 32, 32) and stacked.dtype == torch.float32
    expected = (IMAGES.images[0].astype(np.float32) / 255 - MEAN) / STD
    np.testing.assert_allclose(stacked[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert abs(float(stacked.mean())) < 0.05


def test_train_batches_shuffle_augment_and_drop_last():
    loader = batches(train=True, augmentation=Augmentation(4, True, 8), batch_size=24)
    out = list(loader)
    assert len(out) == len(loader) == 2 and loader.num_images == 48
    images, labels = out[0]
    assert images.shape == (24, 3, 32, 32) and labels.shape == (24,)
    assert not torch.equal(labels, torch.from_numpy(IMAGES.labels[:24]))


def test_crop_and_flip_change_images_into_windows_of_their_source():
    loader = batches(train=True, augmentation=Augmentation(4, True, 0), batch_size=64)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    augmented, labels = next(iter(loader))
    assert torch.equal(labels, torch.from_numpy(IMAGES.labels)[order])
    scale = torch.tensor(STD).view(3, 1, 1) * 255
    shift = torch.tensor(MEAN).view(3, 1, 1) * 255
    pixels = (augmented * scale + shift).round()
    sources = torch.from_numpy(IMAGES.images).permute(0, 3, 1, 2).float()[order]
    padded = torch.nn.functional.pad(sources, (4, 4, 4, 4))
    unchanged = 0
    for image, source, original in zip(pixels, padded, sources, strict=True):
        unchanged += torch.equal(image, original)
        windows = [source[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(image, w) or torch.equal(image, w.flip(-1)) for w in windows)
    assert unchanged < 8


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    image = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    crops = random_crop(padded, 8, torch.Generator().manual_seed(1))
    for crop, source in zip(crops, padded, strict=True):
        windows = [source[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(crop, w) for w in windows)


def test_cutout_zeroes_a_square_of_the_given_size():
    ones = torch.ones(50, 3, 32, 32)
    out = random_cutout(ones, 8, torch.Generator().manual_seed(0))
    zeroed = (out[:, 0] == 0).sum(dim=(1, 2))
    assert zeroed.max() == 64 and zeroed.min() > 0
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)


def test_epoch_stream_depends_only_on_seed_and_epoch():
    def first_batch(epoch: int, seed: int = 3) -> torch.Tensor:
        loader = batches(train=True, augmentation=Augmentation(4, True, 4), seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(2), first_batch(2))
    assert not torch.equal(first_batch(2), first_batch(3))
    assert not torch.equal(first_batch(2), first_batch(2, seed=4))
