"""The hooks :func:`paperlib.train.fit` calls, as one base class, and its default criterion (their own module so
that the collectives, the quantization configs and the methods can use them without importing the training
loop)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Callback:
    """Hooks into :func:`fit`; override what you need. ``state_dict`` goes into every checkpoint."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def before_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        pass

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        """``stats`` holds ``train_loss`` (mean) and ``train_loss_sum``; add keys to record them in history.

        Called after the epoch's scheduler step and *before* its test evaluation, so a callback that changes the
        model here (CBP's multiplier update, a BN re-estimation) changes the model that is evaluated; the test
        metrics are added to the same ``stats`` (and so to the history) afterwards."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The default criterion: cross entropy of ``model(x)``."""
    return F.cross_entropy(model(x), y)


__all__ = ["Callback", "cross_entropy"]
