"""BaLL, the balanced lifelong loss (docs/lifequant.md, "BaLL"): class counts, the scale ``s_c`` and the three loss
forms.

``s_c = 1 / ((n_c / N + 1 / C) · C) = 1 / (1 + C n_c / N)`` over the rows of ``train_t ∪ replay_0 ∪ … ∪
replay_{t-1}`` (``count_classes.py``), computed in float32 as the original does. Loss forms, all mean-reduced:
``"log"`` (the paper's figure, default): ``CE(φ + log s, y)``; ``"softmax_add"`` (ResNet-20/Office/CLEF code):
``CE(φ + softmax(φ) ⊙ s, y)``; ``"mult"`` (MobileNetV2-CIFAR code): ``CE(φ ⊙ s, y)``. Classes missing from the
scale get ``s = 1`` (``lifelong.py`` L179-186).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BallForm = Literal["log", "softmax_add", "mult"]
BALL_FORMS: tuple[str, ...] = ("log", "softmax_add", "mult")
Scale = Mapping[int, float] | Mapping[str, float] | Tensor | Sequence[float]


def _labels_array(labels: object, what: str = "labels") -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    arr = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels))
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must hold integer class ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} holds a negative class id ({arr.min()}); class ids are 0..C-1")
    return arr.astype(np.int64, copy=False)


def class_counts(*labels: Iterable[int] | Tensor | np.ndarray) -> dict[int, int]:
    """``n_c`` over the concatenation of label sequences, keys in first-appearance order
    (original code: ``lifelong_data_generation/count_classes.py``).

    ``class_counts(train_t, replay_0, ..., replay_{t-1})``; overlapping classes are summed.
    """
    if not labels:
        raise ValueError("class_counts needs at least one label sequence, e.g. class_counts(train_labels)")
    allv = np.concatenate([_labels_array(lab) for lab in labels])
    uniq, first, counts = np.unique(allv, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return {int(uniq[i]): int(counts[i]) for i in order}


def ball_scale(counts: Mapping[int, int]) -> dict[int, float]:
    """``s_c = 1 / ((n_c / N + 1 / C) · C)`` in float32, returned as Python floats in the order of ``counts``
    (``count_classes.py``; reference vector 5 of docs/lifequant.md). A class at the balanced frequency ``N / C`` gets
    0.5, a rare (replay-only) class tends
    to 1, a frequent one goes below 0.5.
    """
    if not isinstance(counts, Mapping):
        raise TypeError(
            f"counts must be a mapping class id -> count (see class_counts), got {type(counts).__name__}"
        )
    if not counts:
        raise ValueError("counts is empty: BaLL needs at least one class")
    keys = [int(k) for k in counts]
    values = list(counts.values())
    for k, v in zip(keys, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"count of class {k} is {v!r}; counts must be positive integers")
    n = torch.tensor(values, dtype=torch.float32)
    num_classes = len(keys)
    weights = 1 / ((n / torch.sum(n) + 1 / num_classes) * num_classes)
    return {k: w for k, w in zip(keys, weights.tolist(), strict=True)}


def scale_vector(
    scale: Scale,
    num_classes: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The dense ``[num_classes]`` scale: ``s_c`` for the classes in ``scale``, 1.0 for the others
    (``utils/lifelong.py``).

    ``scale`` is a mapping (int or JSON string keys, as ``reweight_{t}.json``) or a full-length vector.
    """
    if isinstance(scale, Mapping):
        s = torch.ones(num_classes, dtype=torch.float64)
        for k, v in scale.items():
            try:
                c = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"scale key {k!r} is not a class id") from None
            if not 0 <= c < num_classes:
                raise ValueError(
                    f"scale has class {c}, but the logits have {num_classes} classes (ids 0..C-1)"
                )
            if not float(v) > 0:
                raise ValueError(f"scale of class {c} is {v!r}; BaLL scales must be positive")
            s[c] = float(v)
        return s.to(device=device, dtype=dtype)
    s = torch.as_tensor(scale, dtype=dtype, device=device)
    if s.shape != (num_classes,):
        raise ValueError(f"scale vector has shape {tuple(s.shape)}; expected ({num_classes},), one per class")
    return s


def ball_loss(logits: Tensor, labels: Tensor, scale: Scale, form: BallForm = "log") -> Tensor:
    """Mean BaLL loss (docs/lifequant.md, "BaLL"; reference vector 6). ``form``: ``"log"`` = ``CE(φ + log s, y)``
    (figure, default),
    ``"softmax_add"`` = ``CE(φ + softmax(φ) s, y)`` (R20 code), ``"mult"`` = ``CE(φ s, y)`` (MobileNetV2
    code).

    ``scale``: mapping class -> ``s_c`` (missing classes get 1) or a dense vector (see :func:`scale_vector`;
    precompute it once per task to avoid rebuilding it every batch).
    """
    if form not in BALL_FORMS:
        raise ValueError(f"form={form!r} is unknown; use one of {list(BALL_FORMS)}")
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(
            f"logits must be a [batch, classes] tensor, got {getattr(logits, 'shape', type(logits))}"
        )
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must be a [batch] tensor matching logits {tuple(logits.shape)}, "
            f"got {getattr(labels, 'shape', type(labels))}"
        )
    s = scale_vector(scale, logits.shape[1], device=logits.device, dtype=logits.dtype)
    if form == "log":
        z = logits + s.log()
    elif form == "softmax_add":
        z = logits + F.softmax(logits, dim=1) * s
    else:
        z = logits * s
    return F.cross_entropy(z, labels)


class BaLLLoss(nn.Module):
    """``loss_fn(logits, labels)`` around :func:`ball_loss` with a fixed scale (dense vector built lazily)."""

    def __init__(self, scale: Scale, form: BallForm = "log") -> None:
        super().__init__()
        if form not in BALL_FORMS:
            raise ValueError(f"form={form!r} is unknown; use one of {list(BALL_FORMS)}")
        self.scale = dict(scale) if isinstance(scale, Mapping) else torch.as_tensor(scale)
        self.form = form
        self._dense: Tensor | None = None

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        dense = self._dense
        if dense is None or dense.shape != logits.shape[1:] or dense.device != logits.device \
                or dense.dtype != logits.dtype:
            dense = scale_vector(self.scale, logits.shape[1], logits.device, logits.dtype)
            self._dense = dense
        return ball_loss(logits, labels, dense, self.form)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, classes={len(self.scale)}"


def read_reweight(path: str | os.PathLike) -> dict[int, float]:
    """Read a ``reweight_{t}.json`` (string class keys) into ``{class id: s_c}``."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{class id: scale}}, got {type(raw).__name__}")
    return {int(k): float(v) for k, v in raw.items()}
