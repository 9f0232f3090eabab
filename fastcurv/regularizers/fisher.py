"""Fisher regularization of one layer (Fisher-regularization paper, docs/METHODS.md section 4; eq. 6-7 and its appendix A.1 code).

Penalty on a layer's weights ``w``: ``r(w) = gamma * w^T F w + beta * ||w||^2``, two ways:

* ``mode="batch"``, as the paper's code runs it: ``g`` = gradient of the batch loss w.r.t. the layer's
  weight (detached), ``F = |g g^T|`` min-max normalized, ``F~ = (F - min F) / (max F - min F + 1e-8)``.
  With ``u = |g|`` (so ``F_jk = u_j u_k``, ``min F = m^2``, ``max F = M^2`` for ``m = min u``,
  ``M = max u``, as u >= 0):  ``w^T F~ w = ((u . w)^2 - m^2 (sum w)^2) / (M^2 - m^2 + 1e-8)``, O(P);
  the P x P matrix is never built (:func:`fisher_norm`).
* ``mode="per_example"`` (eq. 7 with the batch-averaged empirical Fisher
  ``F = (1/B) sum_i g_i g_i^T``): ``w^T F w = (1/B) sum_i (w . g_i)^2``, g_i = grad of the i-th
  example's loss w.r.t. the layer's (weight, bias), detached. For a layer whose output is linear in
  its parameters (Linear, Conv), ``w . g_i = sum_t delta_it . z_it`` with ``delta = dl_i/dz_i`` and
  ``z`` the layer output: O(B T d_out) from the recorded output and its deltas, no extra GEMM for
  the value; the gradient ``(2/B) sum_i (w . g_i) g_i`` costs one weighted-gradient GEMM (Linear;
  convolutions re-run the conv forward once more to use torch's own adjoint).
  The layer's input and output are recorded by a forward hook of ``reg.track()`` (self-contained:
  ``fastcurv.capture`` did not exist when this was written; it computes the same deltas).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastcurv.regularizers.norms import Regularizer, check_coefficient, layer_weight

__all__ = ["fisher_norm", "FisherNorm"]

_MODES = ("batch", "per_example")


def fisher_norm(w: torch.Tensor, g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``w^T F~ w`` with ``F~`` the min-max normalized ``|g g^T|``, in O(P) (Fisher-regularization paper, docs/METHODS.md section 4; appendix A.1).

    ``F~ = (|g g^T| - min) / (max - min + eps)``, min and max over all P^2 entries. Closed form:
    ``((u . w)^2 - m^2 (sum w)^2) / (M^2 - m^2 + eps)`` with ``u = |g|``, ``m = min u``, ``M = max u``.

    Args:
        w: the weights, any shape; differentiable.
        g: the gradient, same number of elements as ``w``; treated as a constant (detached), as in
            the paper's code (``tf.stop_gradient``).
        eps: the paper's ``1e-8`` in the denominator.

    Returns a scalar in ``w``'s dtype (fp16/bf16 inputs are computed in fp32 and returned in fp32).
    Note the numerator is a difference of two squares: when all ``|g_j|`` are nearly equal it loses
    relative precision (the matrix form does too), so prefer float32 or better.
    """
    if not isinstance(w, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError(
            f"fisher_norm: w and g must be tensors, got {type(w).__name__} and {type(g).__name__}"
        )
    if w.shape != g.shape:
        raise ValueError(
            f"fisher_norm: w and g must have the same shape, got w {tuple(w.shape)} and g {tuple(g.shape)}"
        )
    if w.numel() == 0:
        raise ValueError("fisher_norm: w is empty")
    if not (w.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"fisher_norm: w and g must be floating point, got {w.dtype} and {g.dtype}")
    if w.device != g.device:
        raise ValueError(f"fisher_norm: w is on {w.device} but g on {g.device}")
    dtype = torch.promote_types(torch.promote_types(w.dtype, g.dtype), torch.float32)
    w = w.reshape(-1).to(dtype)
    u = g.detach().reshape(-1).to(dtype).abs()
    m, big_m = u.min(), u.max()
    numerator = torch.dot(u, w).square() - m.square() * w.sum().square()
    return numerator / (big_m.square() - m.square() + eps)


class _LayerGradientDot(torch.autograd.Function):
    """``c_i = <theta, g_i>`` for a layer linear in its parameters theta, with g_i held constant.

    Forward: ``c_i = sum over output elements of delta_i * z_i`` (z, delta detached), O(B T d_out).
    Backward, w.r.t. the layer's parameters only: ``sum_i grad_c_i g_i`` (one weighted-gradient
    GEMM for Linear); nothing flows into the layer's input, since g_i and the input are constants
    of the penalty.
    """

    @staticmethod
    def forward(ctx, layer, inputs, delta, output, *params):
        ctx.layer = layer
        ctx.save_for_backward(inputs, delta)
        return (delta * output).reshape(delta.shape[0], -1).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_c):
        inputs, delta = ctx.saved_tensors
        layer = ctx.layer
        weighted = delta * grad_c.reshape(-1, *([1] * (delta.dim() - 1)))
        if isinstance(layer, nn.Linear):
            flat_delta = weighted.reshape(-1, weighted.shape[-1])
            grads = {"weight": flat_delta.t() @ inputs.reshape(-1, inputs.shape[-1])}
            if layer.bias is not None:
                grads["bias"] = flat_delta.sum(dim=0)
        else:
            # Convolutions: the weight gradient of the layer's own forward (any stride, padding,
            # padding_mode, dilation, groups) with grad_output = grad_c_i * delta_i; this re-runs
            # the conv forward once (one extra GEMM) to reuse torch's exact adjoint.
            leaves = {
                n: p.detach().requires_grad_(p.requires_grad)
                for n, p in layer.named_parameters(recurse=False)
            }
            with torch.enable_grad():
                out = torch.func.functional_call(layer, leaves, (inputs,))
                names = [n for n, leaf in leaves.items() if leaf.requires_grad]
                grads = dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], weighted)))
        trainable = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
        return (None, None, None, None, *[grads[n] for n in trainable])


class FisherNorm(Regularizer):
    """``gamma * w^T F w + beta * ||W||^2`` on one layer (Fisher regularization, docs/METHODS.md section 4).

    Args:
        layer: the regularized layer (the classifier, in the paper), a module with a ``weight``
            (``nn.Linear``; ``mode="per_example"`` also takes ``nn.Conv1d/2d/3d``).
        gamma: weight of the Fisher term (paper: 0.01), ``>= 0``.
        beta: weight of the L2 term on the layer's weight (paper: 0.007), ``>= 0``; the bias is not
            included, as in the paper's code.
        mode: ``"batch"`` or ``"per_example"`` (see the module docstring).

    ``mode="batch"``: ``reg(loss)`` with the batch loss (a scalar; per-example losses ``[B]`` are
    averaged first; since F~ is min-max normalized the reduction only matters through the 1e-8).
    ``w`` is the layer's weight only (the paper's kernel). ``g = d loss / d weight`` is computed with
    ``retain_graph=True`` and detached, so the caller's ``loss.backward()`` still works and the
    penalty's gradient is ``2 gamma F~ w + 2 beta w``. ``reg.track()`` is a no-op.

    ``mode="per_example"``: wrap the forward in ``with reg.track(): out = model(x)`` (a forward hook
    records the layer's input and output), then call
    ``reg(per_example_losses)`` with the UNREDUCED losses ``[B]`` (g_i must be the gradient of
    example i's own loss; mean-scaled losses would shrink the penalty by 1/B^2). ``w`` is (weight,
    bias) together; the g_i are detached, so the gradient is ``(2 gamma / B) sum_i (w . g_i) g_i``
    on the layer's weight and bias and nothing flows into earlier layers through the penalty.
    """

    def __init__(self, layer: nn.Module, gamma: float, beta: float = 0.0, mode: str = "batch"):
        self.gamma = check_coefficient("FisherNorm", "gamma", gamma)
        self.beta = check_coefficient("FisherNorm", "beta", beta)
        if mode not in _MODES:
            raise ValueError(f"FisherNorm: mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.weight = layer_weight("FisherNorm", layer)
        self.layer = layer
        from fastcurv.layers.reparam import reparametrized

        self._reparametrized = sorted(reparametrized(layer))
        if self._reparametrized and (mode == "per_example" or parametrize.is_parametrized(layer)):
            raise ValueError(
                f"FisherNorm(mode={mode!r}): the {self._reparametrized} of layer {type(layer).__name__} are rebuilt "
                "from stored parameters (pruning, weight_norm, spectral_norm or a parametrization). "
                + ("mode='per_example' computes w . g_i from the layer's own parameters, which would be the stored "
                   "ones, not w; " if mode == "per_example" else
                   "a parametrized weight is recomputed at each access, so the gradient of the loss w.r.t. the "
                   "tensor the forward used is not reachable; ")
                + "not supported. Remove the reparametrization (prune.remove / parametrize.remove_parametrizations)"
                + (", or use mode='batch' with torch.nn.utils.prune / the old weight_norm hooks." if mode == "per_example" else
                   ", or use torch.nn.utils.prune / the old torch.nn.utils.weight_norm hooks.")
            )
        if mode == "per_example" and not isinstance(
            layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        ):
            raise ValueError(
                f"FisherNorm(mode='per_example'): layer {type(layer).__name__} is not supported; "
                "w . g_i = sum_t delta_it . z_it needs a layer whose output is linear in its "
                "parameters (nn.Linear, nn.Conv1d/2d/3d). Use mode='batch' for other layers"
            )
        self._recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def track(self):
        """Record the layer's input and output during the forward (``mode="per_example"``).

        A no-op for ``mode="batch"``. The hook is removed when the block exits (also on an
        exception); the recorded tensors (and so the forward graph) stay alive until the next
        ``track()`` or :meth:`clear`.
        """
        if self.mode == "batch":
            yield self
            return
        self.clear()

        def record(module, args, output):
            if self._recorded is not None:
                raise RuntimeError(
                    f"FisherNorm(mode='per_example'): layer {type(module).__name__} was called twice "
                    "inside one reg.track() block (tied weights or a second forward); the per-example "
                    "gradients would mix both uses. Run one forward per track() block"
                )
            self._recorded = (args[0], output)

        handle = self.layer.register_forward_hook(record)
        try:
            yield self
        finally:
            handle.remove()

    def clear(self) -> None:
        """Release the recorded activations (and the forward graph they keep alive)."""
        self._recorded = None

    def _current_weight(self) -> torch.Tensor:
        # a pruned / weight-normed weight is rebuilt by a pre-hook at each forward: the one the loss used
        return self.layer.weight if self._reparametrized else self.weight

    def _l2(self) -> torch.Tensor:
        return self.beta * self._current_weight().pow(2).sum()

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"FisherNorm: expected the loss as a tensor, got {type(loss).__name__}")
        if self.mode == "batch":
            return self._batch(loss)
        return self._per_example(loss)

    def _batch(self, loss: torch.Tensor) -> torch.Tensor:
        if loss.dim() == 1:
            loss = loss.mean()
        elif loss.dim() != 0:
            raise ValueError(
                "FisherNorm(mode='batch'): expected the batch loss (a scalar) or per-example losses "
                f"[B], got shape {tuple(loss.shape)}"
            )
        if not loss.requires_grad:
            raise ValueError(
                "FisherNorm(mode='batch'): the loss does not require grad; compute it from the "
                "model's output and call the regularizer before loss.backward()"
            )
        weight = self._current_weight()
        (g,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
        if g is None:
            raise ValueError(
                f"FisherNorm: the loss does not depend on the weight of {type(self.layer).__name__} "
                f"(shape {tuple(self.weight.shape)}); pass the loss of the model containing this layer"
            )
        penalty = self.gamma * fisher_norm(weight, g)
        return penalty + self._l2() if self.beta else penalty

    def _per_example(self, losses: torch.Tensor) -> torch.Tensor:
        if self._recorded is None:
            raise RuntimeError(
                "FisherNorm(mode='per_example'): no forward of the layer was recorded; run the "
                "forward inside `with reg.track(): out = model(x)` before calling reg(per_example_losses)"
            )
        inputs, output = self._recorded
        if losses.dim() != 1:
            raise ValueError(
                "FisherNorm(mode='per_example'): expected per-example losses of shape [B] "
                f"(reduction='none'), got shape {tuple(losses.shape)}"
            )
        if losses.shape[0] != output.shape[0]:
            raise ValueError(
                f"FisherNorm(mode='per_example'): got {losses.shape[0]} per-example losses but the "
                f"recorded {type(self.layer).__name__} output has batch size {output.shape[0]} "
                f"(shape {tuple(output.shape)})"
            )
        # delta_i = dl_i/dz_i, valid while examples do not interact after this layer (no
        # train-mode BatchNorm downstream). retain_graph: the caller still backpropagates the loss.
        (delta,) = torch.autograd.grad(losses.sum(), output, retain_graph=True, allow_unused=True)
        if delta is None:
            raise ValueError(
                f"FisherNorm(mode='per_example'): the losses do not depend on the output of the "
                f"tracked {type(self.layer).__name__}; pass the losses of the forward run inside track()"
            )
        params = [p for p in self.layer.parameters(recurse=False) if p.requires_grad]
        dots = _LayerGradientDot.apply(
            self.layer, inputs.detach(), delta.detach(), output.detach(), *params
        )
        dots = dots - _frozen_bias_term(self.layer, delta)
        penalty = self.gamma * dots.square().mean()
        return penalty + self._l2() if self.beta else penalty


def _frozen_bias_term(layer: nn.Module, delta: torch.Tensor) -> torch.Tensor | float:
    """``b . sum_t delta_it`` when the bias exists but is frozen: z contains it, w does not."""
    bias = getattr(layer, "bias", None)
    if bias is None or bias.requires_grad:
        return 0.0
    channel_dim = -1 if isinstance(layer, nn.Linear) else 1
    per_channel = delta.detach().movedim(channel_dim, -1).reshape(delta.shape[0], -1, bias.numel())
    return per_channel.sum(dim=1) @ bias.detach()
