"""Weight-norm baselines of the papers' tables: L2, spectral norm (power iteration), group lasso.

All regularizers in :mod:`fastcurv.regularizers` share one calling convention::

    reg = SomeRegularizer(model_or_layer, coefficient, ...)
    with reg.track():            # a no-op for the ones that need nothing from the forward
        out = model(x)
    per_example = loss_fn(out, y, reduction="none")
    loss = per_example.mean() + reg(per_example)
    loss.backward()

``reg(...)`` returns a scalar tensor to add to the loss. The baselines here ignore the loss they are
given (it is accepted, and optional, so that trainers can treat every regularizer alike).

This module also holds the small shared base class and argument checks of the regularizers.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from fastcurv._validate import check_number

__all__ = ["L2", "SpectralNorm", "GroupLasso"]


def check_coefficient(owner: str, name: str, value: float, *, positive: bool = False) -> float:
    """``value`` as a float, or a clear error if it is negative (zero too if ``positive``), not finite
    or not a number (:func:`fastcurv._validate.check_number`)."""
    return check_number(owner, name, value, low=0, low_open=positive)


def trainable_parameters(owner: str, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` that require grad, in ``model.parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: expected an nn.Module, got {type(model).__name__}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{owner}: {type(model).__name__} has no parameters that require grad; nothing to regularize"
        )
    return params


def layer_weight(owner: str, layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` as a parameter requiring grad, or a clear error naming the layer."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{owner}: expected a layer (nn.Module), got {type(layer).__name__}")
    from fastcurv.layers.reparam import effective_tensor

    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        weight = effective_tensor(layer, "weight")  # pruned / weight-normed: requires grad through the stored ones
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{owner}: layer {type(layer).__name__} has no `weight` tensor; expected a layer such as "
            "nn.Linear or nn.Conv2d"
        )
    if not weight.requires_grad:
        raise ValueError(
            f"{owner}: the weight of layer {type(layer).__name__} (shape {tuple(weight.shape)}) does "
            "not require grad; a penalty on it would have no effect"
        )
    return weight


class Regularizer:
    """Base of the regularizers: a ``track()`` context (no-op unless the forward is needed)."""

    def track(self):
        """Context manager to wrap the forward pass in; records nothing for this regularizer."""
        return contextlib.nullcontext(self)


def _sum_or_zero(terms: Iterable[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total if total is not None else like.new_zeros(())


class L2(Regularizer):
    """``(lam / 2) * ||theta||^2`` over every parameter of ``model`` that requires grad (biases too).

    The factor 1/2 makes the gradient ``lam * theta``, the trainers' rule
    ``theta -= lr * (grad L + lam * theta)`` (docs/METHODS.md section 5; equal to SGD's ``weight_decay=lam``).

    ``reg(loss=None)`` ignores ``loss`` and returns the scalar penalty.
    """

    def __init__(self, model: nn.Module, lam: float):
        self.lam = check_coefficient("L2", "lam", lam)
        self.params = trainable_parameters("L2", model)

    def __call__(self, loss: torch.Tensor | None = None) -> torch.Tensor:
        first = self.params[0][1]
        sq = _sum_or_zero((p.pow(2).sum() for _, p in self.params), first)
        return 0.5 * self.lam * sq


class SpectralNorm(Regularizer):
    """``gamma * sigma_max(W) + beta * ||W||^2`` on one layer's weight (a baseline of the Fisher-regularization paper, docs/METHODS.md section 4).

    ``sigma_max`` is estimated by power iteration with a persistent left vector ``u`` (kept on this
    object), ``n_power_iterations`` steps per call, as ``torch.nn.utils.spectral_norm`` does:
    ``v = normalize(W^T u)``, ``u = normalize(W v)``, ``sigma = u^T W v``, with ``u`` and ``v`` treated as
    constants, so the gradient is ``gamma * u v^T`` (the exact gradient of ``sigma_max`` once converged).
    Weights with more than 2 dims (convolutions) are flattened to ``[out_channels, -1]``.
    Each call advances the iteration, so the estimate sharpens over training steps; call
    :meth:`sigma` with more iterations for an accurate value.

    ``reg(loss=None)`` ignores ``loss`` and returns the scalar penalty.
    """

    def __init__(
        self,
        layer: nn.Module,
        gamma: float,
        beta: float = 0.0,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        seed: int | None = 0,
    ):
        self.gamma = check_coefficient("SpectralNorm", "gamma", gamma)
        self.beta = check_coefficient("SpectralNorm", "beta", beta)
        self.n_power_iterations = check_number("SpectralNorm", "n_power_iterations", n_power_iterations,
                                               integer=True, low=1)
        self.eps = check_coefficient("SpectralNorm", "eps", eps, positive=True)
        self.layer = layer
        weight = layer_weight("SpectralNorm", layer)
        if weight.dim() < 2:
            raise ValueError(
                f"SpectralNorm: layer {type(layer).__name__} has a weight of shape "
                f"{tuple(weight.shape)}; expected a matrix (or a conv kernel) with >= 2 dims"
            )
        seed = check_number("SpectralNorm", "seed", seed, integer=True, allow_none=True)
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.randn(weight.shape[0], generator=gen, dtype=torch.float64)
        self._u = (u / u.norm().clamp_min(eps)).to(device=weight.device, dtype=weight.dtype)

    def _matrix(self) -> torch.Tensor:
        weight = self.layer.weight
        return weight.reshape(weight.shape[0], -1)

    @torch.no_grad()
    def _power_iterate(self, w_mat: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = self._u.to(device=w_mat.device, dtype=w_mat.dtype)
        v = None
        for _ in range(steps):
            v = w_mat.t().mv(u)
            v = v / v.norm().clamp_min(self.eps)
            u = w_mat.mv(v)
            u = u / u.norm().clamp_min(self.eps)
        self._u = u
        return u, v

    def sigma(self, n_power_iterations: int | None = None) -> torch.Tensor:
        """The current estimate of ``sigma_max(W)`` (differentiable in W), advancing the iteration."""
        w_mat = self._matrix()
        u, v = self._power_iterate(w_mat.detach(), n_power_iterations or self.n_power_iterations)
        return torch.dot(u, w_mat.mv(v))

    def __call__(self, loss: torch.Tensor | None = None) -> torch.Tensor:
        penalty = self.gamma * self.sigma()
        if self.beta:
            penalty = penalty + self.beta * self.layer.weight.pow(2).sum()
        return penalty


class GroupLasso(Regularizer):
    """``lam * ||W||_{2,1}``: the L2 norm of each output unit's incoming weights, summed.

    For a weight ``W [d_out, d_in]`` (a conv kernel ``[C_out, C_in/groups, *k]`` flattened to
    ``[C_out, -1]``) the groups are the rows of W, one per output unit; biases are not included.
    Given a single layer, that layer's weight; given a model, every ``nn.Linear`` and
    ``nn.Conv1d/2d/3d`` in it (other parameters are left alone; a model with none is an error).
    The gradient at an all-zero row is taken as 0 (a valid subgradient).

    ``reg(loss=None)`` ignores ``loss`` and returns the scalar penalty.
    """

    _GROUPED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, layer_or_model: nn.Module, lam: float):
        self.lam = check_coefficient("GroupLasso", "lam", lam)
        if not isinstance(layer_or_model, nn.Module):
            raise TypeError(
                f"GroupLasso: expected a layer or model (nn.Module), got {type(layer_or_model).__name__}"
            )
        modules = [m for m in layer_or_model.modules() if isinstance(m, self._GROUPED)]
        if not modules:
            if isinstance(getattr(layer_or_model, "weight", None), torch.Tensor):
                modules = [layer_or_model]  # a single custom layer with a weight matrix
            else:
                raise ValueError(
                    f"GroupLasso: {type(layer_or_model).__name__} contains no nn.Linear / nn.Conv layer "
                    "and has no `weight`; nothing to regularize"
                )
        self.weights = []
        for module in modules:
            weight = layer_weight("GroupLasso", module)
            if weight.dim() < 2:
                raise ValueError(
                    f"GroupLasso: layer {type(module).__name__} has a weight of shape "
                    f"{tuple(weight.shape)}; expected >= 2 dims (rows = output units)"
                )
            self.weights.append(weight)
        self.modules = modules

    def __call__(self, loss: torch.Tensor | None = None) -> torch.Tensor:
        from fastcurv.layers.reparam import effective_tensor

        # read at each call: a pruned / weight-normed / parametrized weight is rebuilt from its stored
        # parameters, so the penalty's gradient reaches them (and no stale graph is reused)
        weights = [effective_tensor(m, "weight") for m in self.modules]
        # vector_norm's backward at a zero row is 0, not nan.
        norms = (
            torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).sum() for w in weights
        )
        return self.lam * _sum_or_zero(norms, weights[0])
