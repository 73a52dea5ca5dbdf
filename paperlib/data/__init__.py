"""Data for the companion: the embedded digits default, CIFAR-10/100 from a user root, the
papers' ``image,label`` CSV + image-folder format, in-memory tensors with a batched
loader and batched augmentation.
"""

from __future__ import annotations

from .augment import RandomCropFlip, random_crop_flip
from .digits import DIGITS_CLASSES, DIGITS_COUNTS, load_digits
from .errors import DataError, DataTypeError
from .long_tail import (
    long_tail_counts,
    long_tail_order,
    long_tail_subset,
    read_class_counts,
    write_long_tail_manifests,
)
from .tensors import InMemoryData, TensorLoader, normalize_uint8, resolve_device

# CIFAR and image-folder loaders import torchvision (seconds); load them on first use.
_LAZY = {
    "CIFAR_STATS": "cifar", "export_cifar_to_folder": "cifar", "load_cifar": "cifar", "open_cifar": "cifar",
    "IMAGENET_MEAN": "manifest", "IMAGENET_STD": "manifest", "ManifestDataset": "manifest",
    "load_manifest_tensors": "manifest", "manifest_loader": "manifest", "manifest_transform": "manifest",
    "read_manifest": "manifest",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CIFAR_STATS",
    "DIGITS_CLASSES",
    "DIGITS_COUNTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "DataTypeError",
    "InMemoryData",
    "ManifestDataset",
    "RandomCropFlip",
    "TensorLoader",
    "export_cifar_to_folder",
    "load_cifar",
    "load_digits",
    "load_manifest_tensors",
    "long_tail_counts",
    "long_tail_order",
    "long_tail_subset",
    "read_class_counts",
    "write_long_tail_manifests",
    "manifest_loader",
    "manifest_transform",
    "normalize_uint8",
    "open_cifar",
    "random_crop_flip",
    "read_manifest",
    "resolve_device",
]
