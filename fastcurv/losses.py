"""Losses used by the papers' experiments that torch does not ship.

* :func:`multiclass_hinge`: the Crammer-Singer multiclass hinge loss of the deep SVMs in the Fisher-regularization paper
  (eq. 8), ``max(0, margin + max_{t != y} f_t(x) - f_y(x))``.
"""
from __future__ import annotations

import torch

__all__ = ["multiclass_hinge"]

_REDUCTIONS = ("mean", "sum", "none")


def _under_functorch_transform(tensor: torch.Tensor) -> bool:
    """True inside torch.func.vmap/grad, where reading values (``.item()``) is not allowed."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(tensor))


def multiclass_hinge(
    logits: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Crammer-Singer multiclass hinge loss.

    ``l_i = max(0, margin + max_{t != y_i} f_t(x_i) - f_{y_i}(x_i))``.

    Args:
        logits: ``[B, C]`` scores, floating point, ``C >= 2``.
        target: ``[B]`` integer class indices in ``[0, C)``.
        margin: the margin (``1.0`` in the Fisher-regularization paper); must be finite and ``>= 0``.
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (per-example losses ``[B]``,
            what :class:`fastcurv.regularizers.Curvature` and ``FisherNorm(mode="per_example")`` take).
            Like ``torch.nn.functional.cross_entropy``, ``"mean"`` of an empty batch is ``nan``.

    Differs from ``torch.nn.functional.multi_margin_loss``, which averages the hinge over all
    ``C - 1`` wrong classes (Weston-Watkins); this one takes only the most violating class.
    At ties (two wrong classes with the same largest score) the subgradient goes to one of them.
    Labels are range-checked eagerly (a host sync); inside ``torch.func`` transforms (vmap), where
    values cannot be read, an out-of-range label is left to ``gather``'s own index check.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"multiclass_hinge: logits and target must be tensors, got {type(logits).__name__} "
            f"and {type(target).__name__}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"multiclass_hinge: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (float(margin) >= 0.0 and float(margin) != float("inf")):
        raise ValueError(f"multiclass_hinge: margin must be finite and >= 0, got {margin}")
    if logits.dim() != 2:
        raise ValueError(
            f"multiclass_hinge: logits must be [B, C], got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"multiclass_hinge: logits must be floating point, got {logits.dtype}")
    batch, num_classes = logits.shape
    if num_classes < 2:
        raise ValueError(
            f"multiclass_hinge: need at least 2 classes, got logits of shape {tuple(logits.shape)}"
        )
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(
            f"multiclass_hinge: target must be [B] = [{batch}] class indices to match logits "
            f"{tuple(logits.shape)}, got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"multiclass_hinge: target must hold integer class indices, got {target.dtype} "
            "(one-hot or soft targets: pass target.argmax(dim=1))"
        )
    if target.device != logits.device:
        raise ValueError(
            f"multiclass_hinge: target is on {target.device} but logits on {logits.device}"
        )
    if batch > 0 and not _under_functorch_transform(target):
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"multiclass_hinge: target labels must lie in [0, {num_classes}), got values in "
                f"[{lo}, {hi}]"
            )
    target = target.long()
    true_score = logits.gather(1, target[:, None]).squeeze(1)
    # Exclude the true class from the max with -inf (not by subtracting a big constant, which
    # would be wrong for very large scores).
    is_true = torch.arange(num_classes, device=logits.device) == target[:, None]
    best_wrong = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
    losses = torch.clamp_min(margin + best_wrong - true_score, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.mean()
