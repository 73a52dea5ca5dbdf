"""Batched augmentation on image tensors: random crop with padding and horizontal flip (airbench style).

The papers train CIFAR with ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` per image (original
code: ClimbQ ``data/cifar10_lt.py``, LifeQuant ``data/cifar100_ll.py``). Here the same distribution is drawn
for a whole batch at once: one offset pair ``(dy, dx)`` in ``[0, 2p]^2`` and one flip bit per image from a CPU
``torch.Generator``, then the crop is two ``torch.gather`` calls on the padded batch (no per-sample Python loop).

Larger stored images (Office-31 / ImageCLEF, decoded at 256x256 as by ``Resize((256, 256))`` in LifeQuant's
original code, ``data/office_ll.py``) are cropped to the network's input instead: ``size=224`` with ``padding=0``
is ``RandomCrop(224)`` + flip for training, :func:`center_crop` is ``CenterCrop(224)`` for evaluation;
:func:`train_augment` picks the batch transform of a ``TrainConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import DataError, DataTypeError


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise DataTypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            f"pass torch.Generator().manual_seed(seed) (TensorLoader passes its own)"
        )
    if generator.device.type != "cpu":
        raise DataError(
            f"the generator must live on the CPU (got {generator.device}) so that draws do not depend on "
            f"the device; use torch.Generator(device='cpu')"
        )
    return generator


def _fill_tensor(fill: float | Sequence[float] | Tensor, channels: int, like: Tensor) -> Tensor:
    """Per-channel pad value as a [1, C, 1, 1] tensor on ``like``'s device and dtype."""
    f = torch.as_tensor(fill, dtype=like.dtype).flatten().to(like.device)
    if f.numel() == 1:
        f = f.expand(channels)
    if f.numel() != channels:
        raise DataError(
            f"fill has {f.numel()} values for {channels} channels; give one value or one per channel"
        )
    return f.view(1, channels, 1, 1)


def _check_size(size: object, what: str = "size") -> int | None:
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"{what} must be an int >= 1 (the side of the square crop) or None, got {size!r}")
    return size


def random_crop_flip(
    x: Tensor,
    generator: torch.Generator,
    padding: int = 4,
    flip: bool = True,
    fill: float | Sequence[float] | Tensor = 0.0,
    size: int | None = None,
) -> Tensor:
    """Random ``H x W`` crop of the batch padded by ``padding`` on every side, then a random horizontal flip.

    Equivalent, per image, to torchvision's ``RandomCrop(size=(H, W), padding=padding, fill=fill)`` then
    ``RandomHorizontalFlip(p=0.5)`` (when ``flip``). Draw order from ``generator``: offsets ``dy``, ``dx``
    (``torch.randint(0, 2p+1, (N,))`` each, only when ``padding > 0``), then flip bits
    (``torch.randint(0, 2, (N,))``, only when ``flip``). ``fill`` is the pad value in the units of ``x``
    (one value or one per channel): 0 pads with the *normalised* zero, i.e. the dataset mean colour; use
    ``data.normalized_value(0.0)`` to pad with black as the original pipelines (pad before Normalize) do.
    Returns a new tensor with the shape, dtype and device of ``x``.

    ``size`` (default None: the input's ``H x W``): a ``size x size`` crop of the padded batch instead, e.g.
    ``padding=0, size=224`` on images stored at 256 is torchvision's ``RandomCrop(224)`` + flip (the LifeQuant
    Office/ImageCLEF training transform). The offsets are then ``torch.randint(0, H + 2p - size + 1, (N,))``
    (rows) and ``torch.randint(0, W + 2p - size + 1, (N,))`` (columns), drawn whenever the padded image is
    larger than the crop; the result is ``[N, C, size, size]``.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise DataError(
            f"random_crop_flip expects a batch [N, C, H, W], got shape {tuple(getattr(x, 'shape', ()))}"
        )
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise DataError(f"padding must be an int >= 0, got {padding!r}")
    size = _check_size(size)
    generator = _check_generator(generator)
    n, c, h, w = x.shape
    ph, pw = h + 2 * padding, w + 2 * padding
    oh, ow = (h, w) if size is None else (size, size)
    if oh > ph or ow > pw:
        raise DataError(
            f"crop size {size} is larger than the padded images ({ph} x {pw}); store the images at least at the "
            f"crop size (e.g. decode at 256 for a 224 crop)"
        )
    if oh < ph or ow < pw:
        return _crop_flip(x, generator, padding, flip, fill, oh, ow)
    padded = _pad(x, padding, fill)  # the crop is the whole padded image: no offsets to draw
    if flip:
        flip_bits = torch.randint(0, 2, (n,), generator=generator).to(device=x.device, dtype=torch.bool)
        return torch.where(flip_bits.view(n, 1, 1, 1), padded.flip(3), padded)
    return padded if padding > 0 else x.clone()


def _pad(x: Tensor, padding: int, fill: float | Sequence[float] | Tensor) -> Tensor:
    """``x`` padded by ``padding`` on every side with ``fill`` (a new tensor), or ``x`` itself for 0."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = _fill_tensor(fill, c, x).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    return padded


def _crop_flip(x: Tensor, generator: torch.Generator, padding: int, flip: bool,
               fill: float | Sequence[float] | Tensor, oh: int, ow: int) -> Tensor:
    """The ``oh x ow`` crop at random offsets of ``x`` padded by ``padding``, then the flip (two gathers)."""
    n, c, h, w = x.shape
    ph, pw = h + 2 * padding, w + 2 * padding
    dy = torch.randint(0, ph - oh + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, pw - ow + 1, (n,), generator=generator).to(x.device)
    padded = _pad(x, padding, fill)
    rows = dy.view(n, 1, 1, 1) + torch.arange(oh, device=x.device).view(1, 1, oh, 1)  # [N,1,oh,1]
    out = padded.gather(2, rows.expand(n, c, oh, pw))  # [N, C, oh, W+2p]
    cols = dx.view(n, 1, 1, 1) + torch.arange(ow, device=x.device).view(1, 1, 1, ow)  # [N,1,1,ow]
    if flip:
        flip_bits = torch.randint(0, 2, (n,), generator=generator).to(device=x.device, dtype=torch.bool)
        cols = torch.where(flip_bits.view(n, 1, 1, 1), cols.flip(3), cols)
    return out.gather(3, cols.expand(n, c, oh, ow))


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size x size`` crop of a batch [N, C, H, W]: torchvision's ``CenterCrop(size)`` (top
    ``int(round((H - size) / 2))``, left likewise; e.g. 16 for 256 -> 224). ``x`` itself when it is already
    ``size x size``; else a view (do not modify it in place). Images smaller than ``size`` raise."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise DataError(f"center_crop expects a batch [N, C, H, W], got shape {tuple(getattr(x, 'shape', ()))}")
    size = _check_size(size)
    if size is None:
        raise DataError("center_crop needs a size (an int >= 1)")
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h < size or w < size:
        raise DataError(f"cannot center-crop {h} x {w} images to {size} x {size}; the crop must fit in the images "
                        f"(store them at least at the crop size)")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[:, :, top : top + size, left : left + size]


class RandomCropFlip:
    """Callable ``(x, generator) -> x`` around :func:`random_crop_flip`, for ``TensorLoader(augment=...)``."""

    def __init__(
        self, padding: int = 4, flip: bool = True, fill: float | Sequence[float] | Tensor = 0.0,
        size: int | None = None,
    ) -> None:
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise DataError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)
        self.fill = fill
        self.size = _check_size(size)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(x, generator, padding=self.padding, flip=self.flip, fill=self.fill, size=self.size)

    def __repr__(self) -> str:
        extra = "" if self.size is None else f", size={self.size}"
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill!r}{extra})"


class CenterCrop:
    """Callable ``(x, generator) -> center_crop(x, size)`` (draws nothing): the deterministic ``TensorLoader``
    transform of training without augmentation on images stored larger than the network's input."""

    def __init__(self, size: int) -> None:
        size = _check_size(size)
        if size is None:
            raise DataError("CenterCrop needs a size (an int >= 1)")
        self.size = size

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return center_crop(x, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def train_augment(
    augment: bool, crop: int | None = None, fill: float | Sequence[float] | Tensor = 0.0
) -> RandomCropFlip | CenterCrop | None:
    """The training batch transform of ``TrainConfig(augment=..., crop=...)``:

    - ``crop=None`` (default): ``RandomCropFlip(padding=4, fill=fill)`` when ``augment`` (CIFAR style, pad-4
      random crop at the stored size + flip), else None;
    - ``crop=S``: ``RandomCropFlip(padding=0, size=S)`` when ``augment`` (``RandomCrop(S)`` + flip from the
      larger stored images, no padding), else :class:`CenterCrop` ``(S)``.
    """
    crop = _check_size(crop, "crop")
    if crop is None:
        return RandomCropFlip(fill=fill) if augment else None
    return RandomCropFlip(padding=0, size=crop) if augment else CenterCrop(crop)
