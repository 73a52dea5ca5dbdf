"""Batched augmentation on image tensors: random crop with padding and horizontal flip (airbench style).

The papers train CIFAR with ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` per image (ClimbQ spec
"aug" row, LifeQuant spec transforms). Here the same distribution is drawn for a whole batch at once: one
offset pair ``(dy, dx)`` in ``[0, 2p]^2`` and one flip bit per image from a CPU ``torch.Generator``, then
the crop is two ``torch.gather`` calls on the padded batch (issue 3 §2: no per-sample Python loop).
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


def random_crop_flip(
    x: Tensor,
    generator: torch.Generator,
    padding: int = 4,
    flip: bool = True,
    fill: float | Sequence[float] | Tensor = 0.0,
) -> Tensor:
    """Random ``H x W`` crop of the batch padded by ``padding`` on every side, then a random horizontal flip.

    Equivalent, per image, to torchvision's ``RandomCrop(size=(H, W), padding=padding, fill=fill)`` then
    ``RandomHorizontalFlip(p=0.5)`` (when ``flip``). Draw order from ``generator``: offsets ``dy``, ``dx``
    (``torch.randint(0, 2p+1, (N,))`` each, only when ``padding > 0``), then flip bits
    (``torch.randint(0, 2, (N,))``, only when ``flip``). ``fill`` is the pad value in the units of ``x``
    (one value or one per channel): 0 pads with the *normalised* zero, i.e. the dataset mean colour; use
    ``data.normalized_value(0.0)`` to pad with black as the original pipelines (pad before Normalize) do.
    Returns a new tensor with the shape, dtype and device of ``x``.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise DataError(
            f"random_crop_flip expects a batch [N, C, H, W], got shape {tuple(getattr(x, 'shape', ()))}"
        )
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise DataError(f"padding must be an int >= 0, got {padding!r}")
    generator = _check_generator(generator)
    n, c, h, w = x.shape
    out = x
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        padded = _fill_tensor(fill, c, x).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
        rows = dy.view(n, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)  # [N,1,H,1]
        out = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))  # [N, C, H, W+2p]
        cols = dx.view(n, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)  # [N,1,1,W]
        if flip:
            flip_bits = torch.randint(0, 2, (n,), generator=generator).to(device=x.device, dtype=torch.bool)
            cols = torch.where(flip_bits.view(n, 1, 1, 1), cols.flip(3), cols)
        return out.gather(3, cols.expand(n, c, h, w))
    if flip:
        flip_bits = torch.randint(0, 2, (n,), generator=generator).to(device=x.device, dtype=torch.bool)
        return torch.where(flip_bits.view(n, 1, 1, 1), x.flip(3), x)
    return out.clone()


class RandomCropFlip:
    """Callable ``(x, generator) -> x`` around :func:`random_crop_flip`, for ``TensorLoader(augment=...)``."""

    def __init__(
        self, padding: int = 4, flip: bool = True, fill: float | Sequence[float] | Tensor = 0.0
    ) -> None:
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise DataError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)
        self.fill = fill

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(x, generator, padding=self.padding, flip=self.flip, fill=self.fill)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill!r})"
