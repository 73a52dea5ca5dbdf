"""Classification metrics from logits: top-k, confusion matrix, per-class and balanced accuracy.

Pure functions on tensors; ``classification_report`` gathers them into JSON-native numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``C[t, p]`` = number of samples of true class ``t`` predicted as ``p`` (int64, one ``bincount``)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def topk_correct(logits: Tensor, target: Tensor, k: int) -> Tensor:
    """Number of samples whose target is among the ``k`` largest logits (a 0-d tensor, no host sync)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).sum()


def per_class_accuracy(confusion: Tensor) -> list[float]:
    """Recall of each class; NaN for a class with no test sample."""
    support = confusion.sum(1).double()
    acc = confusion.diag().double() / support
    return [float(a) for a in acc]


def balanced_accuracy(confusion: Tensor) -> float:
    """Mean per-class recall over the classes present in the test set."""
    accs = [a for a in per_class_accuracy(confusion) if not math.isnan(a)]
    return sum(accs) / len(accs) if accs else float("nan")


def classification_report(logits: Tensor, target: Tensor, num_classes: int) -> dict:
    """Top-1 (and top-5 when there are more than 10 classes), per-class and balanced accuracy, confusion."""
    pred = logits.argmax(1)
    conf = confusion_matrix(pred, target, num_classes).cpu()
    n = max(int(target.numel()), 1)
    report = {
        "top1": float(topk_correct(logits, target, 1)) / n,
        "balanced_accuracy": balanced_accuracy(conf),
        "per_class_accuracy": per_class_accuracy(conf),
        "confusion": conf.tolist(),
        "n": int(target.numel()),
    }
    if num_classes > 10:
        report["top5"] = float(topk_correct(logits, target, 5)) / n
    return report
