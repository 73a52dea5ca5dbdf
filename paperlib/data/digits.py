"""The embedded default dataset: scikit-learn's bundled digits.

1,797 grey 8x8 images with integer pixels 0..16 in 10 classes "0".."9" (counts
[178, 182, 177, 183, 181, 182, 181, 179, 174, 180]), shipped inside the scikit-learn wheel, so it needs no
download. A fixed stratified split, optional bilinear resize for CIFAR-shaped models, normalisation with the
train split's statistics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as _sk_load_digits
from sklearn.model_selection import train_test_split

from .errors import DataError, DataTypeError
from .tensors import DeviceLike, InMemoryData, resolve_device

DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
DIGITS_MAX_PIXEL = 16.0


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise DataError(f"{name} must be >= {low}, got {value}")
    return value


def load_digits(
    size: int = 8,
    channels: int = 1,
    test_fraction: float = 0.25,
    seed: int = 0,
    device: DeviceLike = None,
) -> tuple[InMemoryData, InMemoryData]:
    """(train, test) digits as normalised tensors [N, channels, size, size].

    Steps, all on the CPU (so the result and its fingerprint do not depend on ``device``):

    1. ``sklearn.datasets.load_digits()``; pixels divided by 16 (into [0, 1]).
    2. Split sample indices with ``train_test_split(arange(1797), test_size=test_fraction, stratify=y,
       random_state=seed)``; ``source_index`` records them.
    3. When ``size != 8``: ``F.interpolate(mode="bilinear", align_corners=False)`` to ``size x size``.
    4. Normalise with the mean and (population) std of the *train* split's pixels after resizing, so train
       has mean 0 and std 1 exactly; test uses the same constants. ``mean``/``std`` are in [0, 1] pixel
       units (``denormalize`` gives pixel / 16).
    5. ``channels=3`` repeats the grey channel (mean/std repeated too); then move to ``device`` (None: CPU).
    """
    size = _check_int("size", size, 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"channels must be 1 (grey) or 3 (grey repeated, for RGB models), got {channels!r}")
    if not isinstance(test_fraction, float | int) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}; e.g. 0.25")
    seed = _check_int("seed", seed, 0)
    dev = resolve_device(device)

    bunch = _sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / DIGITS_MAX_PIXEL).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=float(test_fraction), stratify=bunch.target, random_state=seed
    )
    train_idx = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    test_idx = torch.from_numpy(np.asarray(test_idx, dtype=np.int64))

    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    train_pixels = images[train_idx].double()
    mean = float(train_pixels.mean())
    std = float(train_pixels.std(correction=0))
    x = (images - mean) / std
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    stats = ((mean,) * channels, (std,) * channels)

    def split(idx: torch.Tensor) -> InMemoryData:
        return InMemoryData(
            x[idx].contiguous().to(dev), labels[idx].to(dev), list(DIGITS_CLASSES), *stats, source_index=idx
        )

    return split(train_idx), split(test_idx)
