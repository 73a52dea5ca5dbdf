"""Data for the companion (issue 3 §2): the embedded digits default, CIFAR-10/100 from a user root, the
papers' ``image,label`` CSV + image-folder format, in-memory tensors with a batched
loader and batched augmentation.
"""

from __future__ import annotations

from .augment import RandomCropFlip, random_crop_flip
from .cifar import CIFAR_STATS, export_cifar_to_folder, load_cifar, open_cifar
from .digits import DIGITS_CLASSES, DIGITS_COUNTS, load_digits
from .errors import DataError, DataTypeError
from .long_tail import (
    long_tail_counts,
    long_tail_order,
    long_tail_subset,
    read_class_counts,
    write_long_tail_manifests,
)
from .manifest import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ManifestDataset,
    load_manifest_tensors,
    manifest_loader,
    manifest_transform,
    read_manifest,
)
from .tensors import InMemoryData, TensorLoader, normalize_uint8, resolve_device

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
