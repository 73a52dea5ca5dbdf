"""One entry point for the datasets the presets name: ``digits`` (embedded), ``cifar10``, ``cifar100``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import DataError, DataTypeError
from .tensors import InMemoryData

DATASETS = ("digits", "cifar10", "cifar100")


def _resize(data: InMemoryData, size: int) -> InMemoryData:
    x = torch.nn.functional.interpolate(data.x, size=(size, size), mode="bilinear", align_corners=False)
    return dataclasses.replace(data, x=x)


def _check_size(size: object) -> int | None:
    """``size`` None (the dataset's own) or an int >= 1; 0 is refused rather than read as "native size"."""
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool):
        raise DataTypeError(f"size must be an int >= 1 or None (the dataset's own size), got "
                            f"{type(size).__name__} {size!r}")
    if size < 1:
        raise DataError(f"size must be an int >= 1 or None (the dataset's own size), got {size}")
    return size


def load_dataset(name: str, data_dir: str | Path | None = None, size: int | None = None, channels: int = 3,
                 seed: int = 0, device: str | torch.device | None = None, *,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> tuple[InMemoryData, InMemoryData]:
    """``(train, test)`` of a named dataset; ``size``/``channels`` reshape digits for CIFAR-shaped models.

    ``mean``/``std`` (CIFAR only; both or neither): normalise with these per-channel constants instead of the
    dataset's own (:data:`paperlib.data.cifar.CIFAR_STATS`), e.g. the CIFAR-10 constants the LifeQuant code uses
    for CIFAR-100. Digits are always normalised with their train split's statistics. ``size`` None keeps the
    dataset's own size (8 for digits, 32 for CIFAR); 0 or a negative size is an error, not "native size"."""
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither (then the dataset's own constants are used)")
    size = _check_size(size)
    if name == "digits":
        if mean is not None:
            raise DataError("digits are normalised with their train split's statistics; mean/std apply to "
                            "cifar10/cifar100 only (leave them None for digits)")
        from .digits import load_digits

        return load_digits(size=size or 8, channels=channels, seed=seed, device=device)
    if name in ("cifar10", "cifar100"):
        if not data_dir:
            raise DataError(
                f"dataset {name!r} needs data_dir: the folder that holds "
                f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}/ (get it on a machine with "
                f"internet via torchvision.datasets.{name.upper()}(root, download=True))"
            )
        from .cifar import load_cifar

        train = load_cifar(data_dir, name=name, train=True, device=device, mean=mean, std=std)
        test = load_cifar(data_dir, name=name, train=False, device=device, mean=mean, std=std)
        if size and size != train.x.shape[-1]:
            train, test = _resize(train, size), _resize(test, size)
        return train, test
    raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
