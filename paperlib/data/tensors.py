"""In-memory datasets and a batch loader for data that fits on the training device (airbench style).

Small datasets (digits, CIFAR) live as one normalised float32 tensor ``x`` [N, C, H, W] and one int64 label
tensor ``y`` [N] on the training device. :class:`TensorLoader` slices them into batches with tensor indexing
(no per-sample Python, no ``DataLoader`` workers) and applies a batched augmentation such as
:func:`paperlib.data.augment.random_crop_flip`. All randomness comes from one CPU ``torch.Generator`` owned by
the loader, whose state is saved and restored with the training checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..device import DeviceLike
from ..device import resolve_device as _resolve_device
from .errors import DataError, DataTypeError

Augment = Callable[[Tensor, torch.Generator], Tensor]



def resolve_device(device: DeviceLike) -> torch.device:
    """``None`` -> CPU (data stays where it is loaded); otherwise :func:`paperlib.device.resolve_device`."""
    return _resolve_device(device, default="cpu")


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items (``torch.tensor_split`` sizes: the
    first ``n % world`` ranks get one more)."""
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"rank {rank} of world size {world}: need 0 <= rank < world_size")
    q, rem = divmod(n, world)
    start = rank * q + min(rank, rem)
    return start, start + q + (1 if rank < rem else 0)


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[tuple[float, ...], ...]:
    """Validate per-channel normalisation constants; a single value is repeated over ``channels``.

    Returns ``(mean, std)`` as tuples of ``channels`` floats; ``std`` must be > 0.
    """
    out = []
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, int | float):
            values = (values,)
        try:
            vals = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise DataTypeError(f"{name} must be a sequence of floats, got {values!r}") from None
        if len(vals) == 1:
            vals = vals * channels
        if len(vals) != channels:
            raise DataError(
                f"{name} has {len(vals)} values but the images have {channels} channels; "
                f"give one value per channel (or a single value for all)"
            )
        if not all(math.isfinite(v) for v in vals):
            raise DataError(f"{name} must be finite, got {vals}")
        out.append(vals)
    if any(s <= 0 for s in out[1]):
        raise DataError(f"std must be > 0 in every channel, got {out[1]}")
    return out[0], out[1]


def normalize_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images / 255 - mean) / std`` per channel for uint8 images [N, C, H, W] -> float32.

    This is ``transforms.ToTensor()`` followed by ``transforms.Normalize(mean, std)``, batched. Every loader
    of 8-bit images in this package goes through it, so the same pixels give bitwise-identical tensors.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"normalize_uint8 expects a uint8 tensor [N, C, H, W], got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape "
            f"{tuple(getattr(images, 'shape', ()))}"
        )
    m, s = check_stats(mean, std, images.shape[1])
    x = images.to(torch.float32).div_(255.0)
    x.sub_(torch.tensor(m, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    x.div_(torch.tensor(s, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    return x


def _as_index(index: object, n: int) -> Tensor:
    """Turn a slice, bool mask or integer indices into a CPU int64 index tensor within ``[0, n)``."""
    if isinstance(index, slice):
        return torch.arange(n)[index]
    if isinstance(index, range):
        index = list(index)
    if isinstance(index, Tensor):
        idx = index.detach().cpu()
    else:
        try:
            idx = torch.as_tensor(np.asarray(index))
        except (TypeError, ValueError, RuntimeError):
            raise DataTypeError(
                f"subset index must be a slice, bool mask or integer indices, got {type(index).__name__}"
            ) from None
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise DataError(
                f"a bool mask must have shape ({n},), got {tuple(idx.shape)}; give one flag per sample"
            )
        return idx.nonzero().flatten()
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise DataTypeError(f"subset index must hold integers or bools, got dtype {idx.dtype}")
    idx = idx.to(torch.int64).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise DataError(
            f"subset index out of range: min {int(idx.min())}, max {int(idx.max())}, "
            f"dataset has {n} samples; use indices in [0, {n})"
        )
    return idx


@dataclass
class InMemoryData:
    """A normalised image dataset held as tensors.

    ``x``: [N, C, H, W] float32, normalised as ``(pixel - mean) / std`` per channel, pixel in [0, 1].
    ``y``: [N] int64 labels in ``[0, len(classes))``. ``mean``/``std``: the per-channel constants used.
    ``source_index``: optional [N] int64 (CPU) positions of the samples in their source dataset.
    """

    x: Tensor
    y: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source_index: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or not isinstance(self.y, Tensor):
            raise DataTypeError(
                f"x and y must be tensors, got {type(self.x).__name__} and {type(self.y).__name__}"
            )
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise DataError(
                f"x must be a float32 tensor [N, C, H, W], got {self.x.dtype} "
                f"of shape {tuple(self.x.shape)}; "
                f"convert with x.float() and add a channel dimension if needed"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise DataError(
                f"y must be an int64 tensor [N], got {self.y.dtype} of shape {tuple(self.y.shape)}; "
                f"use y.long().flatten()"
            )
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} samples but y has {len(self.y)}; give one label per image")
        if self.x.device != self.y.device:
            raise DataError(f"x is on {self.x.device} but y on {self.y.device}; move both with .to(device)")
        if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
            raise DataTypeError(f"classes must be a list of str, got {self.classes!r}")
        self.classes = list(self.classes)
        if not self.classes:
            raise DataError("classes is empty; give one name per class, e.g. ['0', '1', ...]")
        self.mean, self.std = check_stats(self.mean, self.std, self.x.shape[1])
        if self.y.numel():
            lo, hi = int(self.y.min()), int(self.y.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"labels must lie in [0, {self.num_classes}) for {self.num_classes} classes, found "
                    f"min {lo}, max {hi}; fix the labels or the class list"
                )
        if self.source_index is not None:
            self.source_index = torch.as_tensor(self.source_index, dtype=torch.int64).cpu().flatten()
            if len(self.source_index) != len(self.y):
                raise DataError(
                    f"source_index has {len(self.source_index)} entries for {len(self.y)} samples; "
                    f"give one per sample or None"
                )

    @property
    def num_classes(self) -> int:
        """``len(classes)``."""
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        """The device ``x`` and ``y`` live on."""
        return self.x.device

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: DeviceLike) -> InMemoryData:
        """A copy (or the same tensors when already there) on ``device``."""
        dev = resolve_device(device)
        return InMemoryData(
            self.x.to(dev), self.y.to(dev), list(self.classes), self.mean, self.std, self.source_index
        )

    def subset(self, index: object) -> InMemoryData:
        """The samples at ``index`` (slice, bool mask [N] or integer indices), in that order; same classes."""
        idx = _as_index(index, len(self))
        dev_idx = idx.to(self.x.device)
        src = None if self.source_index is None else self.source_index[idx]
        return InMemoryData(self.x[dev_idx], self.y[dev_idx], list(self.classes), self.mean, self.std, src)

    def class_counts(self) -> list[int]:
        """Number of samples per class, length ``num_classes`` (zeros included)."""
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def denormalize(self, x: Tensor | None = None) -> Tensor:
        """Undo the normalisation: ``x * std + mean`` per channel (pixels in [0, 1]); default ``self.x``."""
        x = self.x if x is None else x
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * s + m

    def normalized_value(self, pixel: float = 0.0) -> tuple[float, ...]:
        """Per-channel normalised value of a raw pixel value in [0, 1]: ``(pixel - mean) / std``.

        ``RandomCropFlip(fill=data.normalized_value(0.0))`` pads with black, as torchvision's
        ``RandomCrop(padding=4)`` before ``Normalize`` does in the original training scripts.
        """
        return tuple((float(pixel) - m) / s for m, s in zip(self.mean, self.std, strict=True))

    def fingerprint(self) -> str:
        """sha256 hex digest of shapes, dtypes, classes and the bytes of ``x`` and ``y`` (device-free)."""
        h = hashlib.sha256()
        header = f"InMemoryData|x{tuple(self.x.shape)}:{self.x.dtype}|y{tuple(self.y.shape)}:{self.y.dtype}|"
        h.update(header.encode())
        h.update(("\x1f".join(self.classes)).encode())
        h.update(self.x.detach().cpu().contiguous().numpy().view(np.uint8))
        h.update(self.y.detach().cpu().contiguous().numpy().view(np.uint8))
        return h.hexdigest()


class TensorLoader:
    """Batches of an :class:`InMemoryData` on its device, without per-sample Python or worker processes.

    Each pass (``iter(loader)``) draws, from the loader's own CPU ``torch.Generator`` (seeded with ``seed``),
    a permutation when ``shuffle`` and then, per batch, whatever ``augment(x, generator)`` draws. Save
    ``state_dict()`` with the checkpoint at an epoch boundary; after ``load_state_dict`` the next pass yields
    exactly the batches the uninterrupted run would have. Batches without augmentation may be views of
    ``data.x``: do not modify them in place.

    ``shard=(rank, world_size)`` (data-parallel training, :mod:`paperlib.distributed`): every rank draws the
    same permutation and augmentation of the *global* batch of ``batch_size`` samples (the single-process
    batch) and yields its contiguous part (:func:`shard_bounds`; sizes differ by at most one). A last batch
    with fewer samples than ranks is skipped on every rank (no rank may get an empty batch).
    :meth:`global_batch_size` gives the size of the global batch ``b``.
    """

    def __init__(
        self,
        data: InMemoryData,
        batch_size: int,
        shuffle: bool = False,
        augment: Augment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(data, InMemoryData):
            raise DataTypeError(f"data must be an InMemoryData, got {type(data).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            raise DataTypeError(f"batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if augment is not None and not callable(augment):
            raise DataTypeError(f"augment must be callable (x, generator) -> x or None, got {augment!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise DataTypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        if drop_last and 0 < len(data) < batch_size:
            raise DataError(
                f"drop_last=True with batch_size={batch_size} > {len(data)} samples yields no batch; "
                f"lower batch_size or set drop_last=False"
            )
        if shard is not None:
            if (not isinstance(shard, tuple | list) or len(shard) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
                raise DataTypeError(f"shard must be (rank, world_size) ints or None, got {shard!r}")
            if shard[1] < 1 or not 0 <= shard[0] < shard[1]:
                raise DataError(f"shard={tuple(shard)}: need 0 <= rank < world_size")
            if batch_size < shard[1]:
                raise DataError(f"batch_size={batch_size} is the global batch and must be >= the number of "
                                f"processes ({shard[1]}); raise batch_size or start fewer processes")
            shard = (int(shard[0]), int(shard[1]))
        self.shard = shard
        self.data = data
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def _num_global(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def global_batch_size(self, b: int) -> int:
        """Number of samples in global batch ``b`` (all shards together)."""
        return max(0, min(self.batch_size, len(self.data) - b * self.batch_size))

    def __len__(self) -> int:
        nb = self._num_global()
        if self.shard is not None and nb and self.global_batch_size(nb - 1) < self.shard[1]:
            nb -= 1
        return nb

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x_all, y_all = self.data.x, self.data.y
        order = None
        if self.shuffle:
            order = torch.randperm(len(self.data), generator=self.generator).to(x_all.device)
        bs = self.batch_size
        for b in range(len(self)):
            lo, hi = b * bs, min((b + 1) * bs, len(self.data))
            part = slice(None)
            if self.shard is not None:
                start, stop = shard_bounds(hi - lo, self.shard[1], self.shard[0])
                part = slice(start, stop)
                if self.augment is None:  # only this rank's rows are gathered
                    lo, hi = lo + start, lo + stop
                    part = slice(None)
            if order is None:
                x, y = x_all[lo:hi], y_all[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = x_all[idx], y_all[idx]
            if self.augment is not None:  # the whole global batch: the same draws as a single process
                x = self.augment(x, self.generator)
            yield (x, y) if self.shard is None else (x[part], y[part])

    def state_dict(self) -> dict[str, object]:
        """The generator state (and the seed, for the record)."""
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        gen_state = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(gen_state, Tensor) or gen_state.dtype != torch.uint8:
            raise DataError(
                "loader state must be a dict with a uint8 tensor under 'generator'; "
                "pass what TensorLoader.state_dict() returned"
            )
        self.generator.set_state(gen_state.cpu())
