"""ClimbQ's training hooks for :func:`paperlib.train.fit`: class distribution scaling (:class:`SigmaScaling`) and the
HomoVar criterion (:class:`HomoVarCriterion`), and :class:`ClimbQConfig`, whose ``hooks`` builds both for a model
and its training data. They work unchanged in one process and under ``torchrun``: the batch statistics come from
the global batch through :func:`paperlib.distributed.all_gather_cat`, the identity in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .callback import Callback, cross_entropy
from .climbq import (
    FULL_PRECISION,
    ClimbQActivation,
    ClimbQWeight,
    HomoVarLoss,
    _check_bits,
    batch_sigma,
    homovar_weighted_loss,
    set_sigma,
)
from .distributed import all_gather_cat, is_distributed, local_slice
from .models.features import logits_and_features
from .quant.config import Hooks, QuantConfig, check_positive


class SigmaScaling(Callback):
    """ClimbQ's class distribution scaling: per-sample sigma from the batch labels before each forward
    (original code: main.py, the batch class frequencies passed to every activation quantizer).

    Records the largest ``|sigma - 2|`` seen (below 0.05 for B = 128: sigma = 2 - p~ moves by less than 1 %),
    and with ``batch_size`` also the largest over full batches only (``max_deviation_full``; an epoch's last,
    partial batch excluded). Both running maxima are in ``state_dict``, so a run resumed from a checkpoint
    reports the maxima of the uninterrupted run. Under ``torchrun`` sigma comes from the global batch's class
    counts (every rank's labels gathered) and the maxima are those of the global batches, as in one process.
    """

    def __init__(self, num_classes: int, mode: str = "batch_freq", counts: Sequence[int] | None = None,
                 batch_size: int | None = None) -> None:
        self.num_classes, self.mode, self.counts, self.batch_size = num_classes, mode, counts, batch_size
        self._max_dev: Tensor | None = None
        self._max_dev_full: Tensor | None = None

    def before_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        y_all, sizes = all_gather_cat(y)  # under torchrun the global batch's labels; one process: y itself
        s = batch_sigma(y_all, self.num_classes, self.mode, counts=self.counts)
        set_sigma(model, s[local_slice(sizes)])
        self._record(s)

    def _record(self, sigma: Tensor) -> None:
        """Update the running maxima with one (whole) batch's sigma."""
        dev = (sigma - 2).abs().max()
        self._max_dev = dev if self._max_dev is None else torch.maximum(self._max_dev, dev)
        if self.batch_size is not None and sigma.numel() == self.batch_size:
            self._max_dev_full = dev if self._max_dev_full is None else torch.maximum(self._max_dev_full, dev)

    @property
    def max_deviation(self) -> float:
        return float("nan") if self._max_dev is None else float(self._max_dev)

    @property
    def max_deviation_full(self) -> float:
        """The largest ``|sigma - 2|`` over batches of exactly ``batch_size`` samples (NaN: none seen)."""
        return float("nan") if self._max_dev_full is None else float(self._max_dev_full)

    def state_dict(self) -> dict[str, Any]:
        def keep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        return {"max_dev": keep(self._max_dev), "max_dev_full": keep(self._max_dev_full)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._max_dev, self._max_dev_full = state.get("max_dev"), state.get("max_dev_full")


class HomoVarCriterion(Callback):
    """Criterion and callback: ``HomoVarLoss(counts)(fc(f), y, f)`` with ``f = forward_features(x)`` computed once
    (on a model without ``forward_features``: the input of its last ``nn.Linear``, :func:`logits_and_features`).
    Under ``torchrun`` the statistics and class weights come from the global batch (gathered), applied to the
    local logits; identical to one process's loss of the global batch.

    Per epoch it adds ``homovar_fraction_out`` (mean over steps of the fraction of classes out of bounds),
    ``homovar_steps_all_in`` (the share of steps with no class out of bounds) and ``homovar_W`` to the history;
    ``last_epoch`` holds the per-class means (NaN-aware) over the last epoch's
    steps of n_lb, n_ub, beta and the class weights. Sums stay on the device until the epoch ends.
    """

    def __init__(self, counts: Sequence[int] | str, alpha: float = 0.05, beta: float = 0.999,
                 base: str = "bce") -> None:
        self.loss = HomoVarLoss(counts, alpha, beta, base=base)
        self.last_epoch: dict[str, list[float]] = {}
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}

    def _add(self, key: str, v: Tensor) -> None:
        v = v.detach().double()
        ok = ~torch.isnan(v)
        s, n = torch.where(ok, v, torch.zeros_like(v)), ok.double()
        if key in self._sums:
            self._sums[key] += s
            self._counts[key] += n
        else:
            self._sums[key], self._counts[key] = s, n

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits, feats = logits_and_features(model, x)
        if is_distributed():
            # the statistics of the global batch (every rank's detached labels, features and logits gathered in
            # rank order), exactly as one process computes them; the class weights then weigh the local logits,
            # whose mean loss DDP averages into the gradient of the global batch's loss
            y_all, _ = all_gather_cat(y)
            self.loss(all_gather_cat(logits.detach())[0], y_all, all_gather_cat(feats.detach().flatten(1))[0])
            loss = homovar_weighted_loss(logits, y.long(), self.loss.last.weights, self.loss.base)
        else:
            loss = self.loss(logits, y, feats)
        step = self.loss.last
        for key, v in (("fraction_out", step.fraction_out), ("all_in", (step.fraction_out == 0).double()),
                       ("W", step.W), ("n_lb", step.n_lb), ("n_ub", step.n_ub), ("beta", step.beta),
                       ("weights", step.weights)):
            self._add(key, v)
        self._steps += 1
        return loss

    def on_epoch_end(self, epoch: int, stats: dict[str, Any]) -> None:
        mean = {k: (self._sums[k] / self._counts[k]).cpu() for k in self._sums}  # 0/0 -> NaN: never defined
        stats["homovar_fraction_out"] = float(mean["fraction_out"])
        stats["homovar_steps_all_in"] = float(mean["all_in"])
        stats["homovar_W"] = float(mean["W"])
        self.last_epoch = {k: [float(v) for v in mean[k].reshape(-1)] for k in ("n_lb", "n_ub", "beta", "weights")}
        self.last_epoch["fraction_out"] = [float(mean["fraction_out"])]
        self._reset()


@dataclass(frozen=True)
class ClimbQConfig(QuantConfig):
    """ClimbQ for :func:`paperlib.quantize_`: Gaussian-CDF weights and activations (:class:`ClimbQWeight`,
    :class:`ClimbQActivation`), the last layer in full precision as in the original code (``skip="last"``).

    ``ClimbQConfig(bits=4)``: W4A4; ``act_range`` R and ``eval_sigma`` as in :class:`ClimbQActivation`. Training
    (:meth:`hooks`): class distribution scaling sets the per-sample sigma of the activation quantizers before each
    forward (:class:`SigmaScaling`, ``sigma_mode``), and ``loss="homovar"`` trains with the HomoVar loss
    (:class:`HomoVarCriterion`, ``alpha``, ``beta``, ``homovar_base``) with the training data's class counts;
    ``loss="ce"``: cross entropy."""

    bits: int = 4
    act_bits: int | None = None
    act_range: float = 2.0
    eval_sigma: float = 2.0
    skip: str | tuple[str, ...] = "last"
    activation: str = "auto"
    loss: str = "homovar"
    sigma_mode: str = "batch_freq"
    alpha: float = 0.05
    beta: float = 0.999
    homovar_base: str = "bce"
    method: ClassVar[str] = "climbq"

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.act_bits is not None:
            _check_bits(self.act_bits)
        check_positive(self.act_range, "act_range")
        check_positive(self.eval_sigma, "eval_sigma")
        if self.loss not in ("homovar", "ce"):
            raise ValueError(f"loss={self.loss!r}: use 'homovar' (the HomoVar loss) or 'ce' (cross entropy)")
        if self.sigma_mode not in ("batch_freq", "none", "prior"):
            raise ValueError(f"sigma_mode={self.sigma_mode!r}: use 'batch_freq', 'none' or 'prior'")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                raise ValueError(f"{name}={v!r}: must be in (0, 1)")
        if self.homovar_base not in ("bce", "ce"):
            raise ValueError(f"homovar_base={self.homovar_base!r}: use 'bce' or 'ce'")
        self.check_common()

    def weight_quantizer(self, layer: nn.Module) -> nn.Module:
        return ClimbQWeight(self.bits)

    def activation_quantizer(self) -> nn.Module | None:
        bits = self.activation_bits()
        return None if bits == FULL_PRECISION else ClimbQActivation(bits, self.act_range, self.eval_sigma)

    def hooks(self, model: nn.Module, train_data: Any) -> Hooks:
        if not callable(getattr(train_data, "class_counts", None)):
            raise TypeError(f"ClimbQ's hooks read the training data's class counts: pass an InMemoryData (e.g. "
                            f"paperlib.data.digits.load_digits()[0]), got {type(train_data).__name__}")
        counts = train_data.class_counts()
        sigma = SigmaScaling(len(counts), self.sigma_mode, counts=counts)
        if self.loss == "ce":
            return Hooks(cross_entropy, [sigma])
        hv = HomoVarCriterion(counts, self.alpha, self.beta, self.homovar_base)
        return Hooks(hv, [sigma, hv])


__all__ = ["ClimbQConfig", "HomoVarCriterion", "SigmaScaling"]
