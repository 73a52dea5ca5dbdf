"""Logits and penultimate features of any classifier in one forward (for losses that need both, e.g. ClimbQ's
HomoVar and the Levene analysis).

A model of this package has ``forward_features(x)`` (the pooled penultimate features) and ``fc``: then
``fc(forward_features(x))`` is used, exactly the model's forward. Any other model (torchvision's ``resnet18``,
``mobilenet_v2``, a plain ``nn.Sequential``) runs its normal forward while a hook records the input of its last
``nn.Linear``, the classifier: those are its penultimate features, flattened to [batch, features].
"""

from __future__ import annotations

from torch import Tensor, nn


def classifier(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in module order (its classifier); a clear error when it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier: its penultimate features are the "
                         "input of the last nn.Linear, so give it one or a forward_features(x) method and an fc")
    return linears[-1]


def logits_and_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, features)`` of one forward of ``model`` on ``x`` (module docstring)."""
    features = getattr(model, "forward_features", None)
    fc = getattr(model, "fc", None)
    if callable(features) and isinstance(fc, nn.Module):
        f = features(x)
        return fc(f), f
    seen: list[Tensor] = []
    handle = classifier(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"the classifier of {type(model).__name__} ran {len(seen)} times in one forward; "
                         "give the model forward_features(x) and fc")
    return logits, seen[0].flatten(1)


__all__ = ["classifier", "logits_and_features"]
