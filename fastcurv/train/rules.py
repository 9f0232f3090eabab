"""Learning rules: small adapters that turn one batch into one optimizer step.

Every rule follows the same convention (docs/METHODS.md section 5 and the regularizers' docstrings)::

    theta <- optimizer_step(grad [ mean_i l_i + penalty ])

so with plain SGD the update is ``theta -= lr * (grad L + grad penalty)``: every regularization term is
scaled by the learning rate. Paper 002 writes its Table 4.1 with the regularization rate outside the
learning rate (``theta -= lr grad L + lambda_thesis * d``); its own remark (section 1) gives the
conversion ``lam = lambda_thesis / lr``.

Rules (``RULES``), with their hyperparameters and defaults:

* ``sgd``: no penalty.
* ``l2`` (``lam``): ``(lam/2) ||theta||^2``, gradient ``lam * theta``.
* ``curvature`` (``alpha``, ``subsample``, ``every``): Geng et al., ``alpha * mean_i ||grad l_i||^2`` (exact,
  double backward; ``subsample=b`` / ``every=k``: the cheap estimators of :class:`fastcurv.regularizers.Curvature`).
* ``fisher`` (``gamma``, ``beta``, ``mode``): the Fisher penalty (docs/METHODS.md section 4) on the last weight layer
  (the classifier), trained with the multiclass hinge loss by default (``fit(loss="auto")``).
* ``subbatch`` (``alpha``, ``beta``, ``num_subbatches``, ``exact``): Jia & Su's ``beta R_alpha`` (docs/METHODS.md section 3).
* ``metric`` (``lam``, ``absolute``): Jarvis 2021, update term ``lam * thetabar^T H``.
* ``selective_l2`` (``lam``, ``omega``): L2 only where ``|thetabar^T H| < omega * max`` per tensor.
* ``l2_stopped`` (``lam``, ``tau``): L2 for epochs ``t < tau``, then SGD.
* ``l2_stopped_selective`` (``lam``, ``selective_lam``, ``omega``, ``tau``): L2 (rate ``lam``) for
  ``t < tau``, then Selective L2 (rate ``selective_lam``; Jarvis 2021 tunes the two rates separately).

* ``sam`` (``rho``, ``adaptive``, ``eta``): SAM (Foret et al. 2021), update direction
  ``grad L(theta + e)``, ``e = rho g / ||g||``, ``g = grad L(theta)``; ``adaptive=True`` is ASAM (Kwon et al.
  2021): ``e = rho T^2 g / ||T g||`` with ``T = |w| + eta`` on weights (1 on biases); ASAM's radius is larger
  (its paper uses rho = 0.5 to 2.0).
* ``gnp`` (``r``, ``alpha``): gradient-norm penalty by finite differences (Zhao et al. 2022, eq. 9):
  ``(1 - alpha) grad L(theta) + alpha grad L(theta + r g / ||g||)``.
* ``looksam`` (``rho``, ``k``, ``alpha``): LookSAM (Liu et al. 2022, Algorithm 1): SAM's gradient ``g_s``
  every ``k``-th step, storing its component orthogonal to ``g``, ``g_v = g_s - (g_s . g / ||g||^2) g``;
  on the steps between one gradient and ``g + alpha (||g|| / ||g_v||) g_v``.

These three penalize (to first order) the norm of the *batch* gradient, not the mean per-example norm,
and each takes two forward+backward passes on the steps where it perturbs (docs/METHODS.md section 7).

``tau=None`` means half of the run's epochs (resolved by :func:`fastcurv.train.fit`). Epochs are
0-based, so ``tau`` is the number of epochs with L2.

A rule is built with :func:`make_rule` (``make_rule("l2", lam=1e-3)``), bound to a model by ``fit``
and then called once per batch through :meth:`Rule.step`.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from fastcurv._validate import check_number

RULES = ("sgd", "l2", "curvature", "fisher", "subbatch", "metric", "selective_l2",
         "l2_stopped", "l2_stopped_selective", "sam", "gnp", "looksam")

# Defaults in this module's lr-scaled convention. Paper values where they exist: subbatch alpha=1e-4,
# M=8, beta in Jia & Su's grid {1..100}; fisher gamma=0.01, beta=0.007 (Fisher-regularization paper); the L2, metric and
# selective rates are Jarvis 2021's Table 4.2 rates for MNIST/Tanh divided by its learning rate 1e-3
# (L2 1e-5 -> 1e-2, Metric 1e-4 -> 0.1, Selective L2 1e-3 -> 1.0 with omega = 0.001). Curvature's
# alpha=1e-2 is ours (Geng et al.'s values are for a 3x4096 MLP): checked to train digits to ~97%.
# SAM's rho=0.05 and ASAM's eta=0.01 are their papers' defaults (ASAM uses a larger rho); GNP's r=0.05 and
# alpha=0.8 are Zhao et al. 2022's; LookSAM's k=5 and alpha=0.7 are Liu et al. 2022's.
DEFAULTS: dict[str, dict] = {
    "sgd": {},
    "l2": {"lam": 1e-2},
    "curvature": {"alpha": 1e-2, "subsample": None, "every": 1},
    "fisher": {"gamma": 1e-2, "beta": 7e-3, "mode": "batch"},
    "subbatch": {"alpha": 1e-4, "beta": 10.0, "num_subbatches": 8, "exact": False},
    "metric": {"lam": 0.1, "absolute": False},
    "selective_l2": {"lam": 1.0, "omega": 1e-3},
    "l2_stopped": {"lam": 1e-2, "tau": None},
    "l2_stopped_selective": {"lam": 1e-2, "selective_lam": 1.0, "omega": 1e-3, "tau": None},
    "sam": {"rho": 0.05, "adaptive": False, "eta": 0.01},
    "gnp": {"r": 0.05, "alpha": 0.8},
    "looksam": {"rho": 0.05, "k": 5, "alpha": 0.7},
}

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteError(RuntimeError):
    """Training produced a nan/inf loss or parameter; raised instead of training on garbage."""


class Rule:
    """Base learning rule: forward, per-example losses, ``(mean + penalty).backward()``, optimizer step.

    Subclasses override :meth:`penalty` (or :meth:`step` when the forward must be tracked). After
    :meth:`bind`, ``self.model`` and ``self.loss_fn`` (per-example losses ``[B]``) are set.
    """

    name = "rule"
    # fit(statistics=...) sets a fastcurv.train.statistics.StepStatistics here for rules that keep this step
    statistics = None

    def __init__(self, **hyper):
        defaults = DEFAULTS.get(self.name, {})
        unknown = sorted(set(hyper) - set(defaults))
        if unknown:
            valid = ", ".join(sorted(defaults)) or "none"
            raise ValueError(f"rule {self.name!r}: unknown hyperparameter(s) {unknown}; valid: {valid}")
        self.hyper = {**defaults, **hyper}
        self.model: nn.Module | None = None
        self.loss_fn: PerExampleLoss | None = None

    def bind(self, model: nn.Module, loss_fn: PerExampleLoss, epochs: int) -> "Rule":
        """Attach to ``model``; ``loss_fn(out, y)`` returns per-example losses ``[B]``."""
        self.model, self.loss_fn = model, loss_fn
        if "tau" in self.hyper and self.hyper["tau"] is None:
            self.hyper["tau"] = max(epochs // 2, 0)
        if "tau" in self.hyper:
            self.hyper["tau"] = check_number(f"rule {self.name!r}", "tau", self.hyper["tau"], integer=True, low=0,
                                             why="epochs with L2")
        return self

    def config(self) -> dict:
        return {"rule": self.name, **self.hyper}

    def penalty(self, per_example: torch.Tensor, x: torch.Tensor, y: torch.Tensor, epoch: int):
        """The term added to the mean loss for this batch, or ``None``."""
        return None

    def step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, epoch: int,
             active: bool = True) -> torch.Tensor:
        """One update on batch ``(x, y)``; returns the detached mean data loss (before the step).

        ``active=False`` (before the first LR drop with ``regularize_after_first_drop``) runs plain SGD.
        """
        optimizer.zero_grad(set_to_none=True)
        stats = self.statistics
        with stats.capturing() if stats is not None else contextlib.nullcontext():
            out = self.model(x)
        per_example = self.loss_fn(out, y)
        loss = per_example.mean()
        _check_finite_loss(loss, self.name, epoch)
        term = self.penalty(per_example, x, y, epoch) if active else None
        if stats is not None:
            # the data gradient and the per-example statistics from one backward, then the penalty's
            stats.backward(per_example)
            if term is not None:
                term.backward()
        else:
            (loss if term is None else loss + term).backward()
        optimizer.step()
        return loss.detach()

    # State that must survive a checkpoint (e.g. persistent power-iteration vectors).
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _check_finite_loss(loss: torch.Tensor, rule: str, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"rule {rule!r}: the training loss is {loss.item()} at epoch {epoch}; stopping instead of "
            "training on garbage (lower the learning rate or the regularization strength)"
        )


class SGD(Rule):
    name = "sgd"


class L2Rule(Rule):
    name = "l2"

    def bind(self, model, loss_fn, epochs):
        from fastcurv.regularizers.norms import L2

        super().bind(model, loss_fn, epochs)
        self.reg = L2(model, self.hyper["lam"])
        return self

    def penalty(self, per_example, x, y, epoch):
        return self.reg()


class Curvature(Rule):
    name = "curvature"
    _ESTIMATOR_DEFAULTS = {"subsample": None, "every": 1}

    def bind(self, model, loss_fn, epochs):
        from fastcurv.regularizers.curvature import Curvature as CurvatureRegularizer

        super().bind(model, loss_fn, epochs)
        self.reg = CurvatureRegularizer(model, self.hyper["alpha"], subsample=self.hyper["subsample"],
                                        every=self.hyper["every"], loss_fn=loss_fn)
        return self

    def config(self) -> dict:
        # The estimator options appear only when set: configurations (and checkpoints) of exact runs
        # stay what they were before the options existed.
        return {"rule": self.name, **{k: v for k, v in self.hyper.items()
                                      if self._ESTIMATOR_DEFAULTS.get(k, object()) != v}}

    def step(self, x, y, optimizer, epoch, active=True):
        optimizer.zero_grad(set_to_none=True)
        if not active:
            return super().step(x, y, optimizer, epoch, active=False)
        if self.hyper["subsample"] is not None:
            # the penalty's own captured forward on b examples also gives their data loss; the others
            # run a plain forward (Curvature.backward_with_loss)
            loss, _ = self.reg.backward_with_loss(x, y)
            _check_finite_loss(loss, self.name, epoch)
        else:
            with self.reg.track():  # with every=k, records nothing on the steps that reuse the stored gradient
                out = self.model(x)
            per_example = self.loss_fn(out, y)
            loss = per_example.mean()
            _check_finite_loss(loss, self.name, epoch)
            self.reg.backward(per_example)  # (mean + alpha * mean_i ||grad l_i||^2).backward(), fast path
        optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return self.reg.estimator_state() if self.hyper["every"] > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.reg.load_estimator_state(state)


def last_weight_layer(model: nn.Module) -> nn.Module:
    """The last module (in registration order) with a ``weight`` of >= 2 dims: the classifier."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
              and m.weight.dim() >= 2]
    if not layers:
        raise ValueError(f"rule 'fisher': {type(model).__name__} has no layer with a weight matrix to regularize")
    return layers[-1]


class Fisher(Rule):
    name = "fisher"

    def bind(self, model, loss_fn, epochs):
        from fastcurv.regularizers.fisher import FisherNorm

        super().bind(model, loss_fn, epochs)
        self.layer = last_weight_layer(model)
        self.reg = FisherNorm(self.layer, self.hyper["gamma"], beta=self.hyper["beta"], mode=self.hyper["mode"])
        return self

    def step(self, x, y, optimizer, epoch, active=True):
        optimizer.zero_grad(set_to_none=True)
        if not active:
            return super().step(x, y, optimizer, epoch, active=False)
        with self.reg.track():
            out = self.model(x)
        per_example = self.loss_fn(out, y)
        loss = per_example.mean()
        _check_finite_loss(loss, self.name, epoch)
        (loss + self.reg(per_example)).backward()
        optimizer.step()
        return loss.detach()


class SubBatch(Rule):
    name = "subbatch"

    def bind(self, model, loss_fn, epochs):
        from fastcurv.regularizers.subbatch import SubBatchGradNorm

        super().bind(model, loss_fn, epochs)
        # R_alpha is built from MEAN sub-batch losses of the same per-example loss the rule trains on.
        self.reg = SubBatchGradNorm(
            model, alpha=self.hyper["alpha"], beta=self.hyper["beta"],
            num_subbatches=self.hyper["num_subbatches"], exact=self.hyper["exact"], loss_fn=loss_fn,
        )
        return self

    def step(self, x, y, optimizer, epoch, active=True):
        if not active:
            return super().step(x, y, optimizer, epoch, active=False)
        optimizer.zero_grad(set_to_none=True)
        # grad [L(B, w) + beta R_alpha] from the regularizer's two passes: the data loss comes from its
        # clean pass (with BatchNorm in train mode: per-sub-batch statistics, see SubBatchGradNorm)
        loss = self.reg.backward(x, y)
        _check_finite_loss(loss, self.name, epoch)
        optimizer.step()
        return loss


class _HessianProductRule(Rule):
    """Rules whose penalty needs ``H thetabar`` (Metric, Selective L2): the step is
    ``reg.backward(per_example)``, which takes the data gradient from the create_graph backward the HVP
    needs anyway (one forward, one create_graph backward, one double backward; nothing recomputed).

    ``make_regularizer(model)`` builds the regularizer; ``hessian_regularizer(epoch)`` says which one
    this epoch uses (``None``: fall back to :meth:`Rule.step` and :meth:`penalty`)."""

    def make_regularizer(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, model, loss_fn, epochs):
        super().bind(model, loss_fn, epochs)
        self.reg = self.make_regularizer(model)
        return self

    def hessian_regularizer(self, epoch: int):
        return self.reg

    def step(self, x, y, optimizer, epoch, active=True):
        reg = self.hessian_regularizer(epoch) if active else None
        if reg is None:
            return super().step(x, y, optimizer, epoch, active)
        optimizer.zero_grad(set_to_none=True)
        per_example = self.loss_fn(self.model(x), y)
        loss = per_example.mean()
        _check_finite_loss(loss, self.name, epoch)
        reg.backward(per_example)
        optimizer.step()
        return loss.detach()


class Metric(_HessianProductRule):
    name = "metric"

    def make_regularizer(self, model):
        from fastcurv.regularizers.metric import Metric as MetricRegularizer

        return MetricRegularizer(model, self.hyper["lam"], absolute=self.hyper["absolute"])


class SelectiveL2(_HessianProductRule):
    name = "selective_l2"

    def make_regularizer(self, model):
        from fastcurv.regularizers.metric import SelectiveL2 as SelectiveL2Regularizer

        return SelectiveL2Regularizer(model, self.hyper.get("selective_lam", self.hyper["lam"]), self.hyper["omega"])


class L2Stopped(Rule):
    """L2 for epochs ``t < tau``, then plain SGD (Jarvis 2021, Table 4.1)."""

    name = "l2_stopped"

    def bind(self, model, loss_fn, epochs):
        from fastcurv.regularizers.norms import L2

        super().bind(model, loss_fn, epochs)
        self.l2 = L2(model, self.hyper["lam"])
        return self

    def penalty(self, per_example, x, y, epoch):
        return self.l2() if epoch < self.hyper["tau"] else None


class L2StoppedSelective(SelectiveL2, L2Stopped):
    """L2 (``lam``) for epochs ``t < tau``, then Selective L2 (``selective_lam``) (Jarvis 2021, Table 4.1)."""

    name = "l2_stopped_selective"

    def hessian_regularizer(self, epoch):
        return self.reg if epoch >= self.hyper["tau"] else None


class _TwoPassRule(Rule):
    """Rules that leave a direction built from loss gradients at perturbed weights in ``.grad`` (SAM,
    ASAM, GNP, LookSAM). :meth:`gradient` does that and restores the weights; :meth:`step` is
    ``zero_grad``, :meth:`gradient`, ``optimizer.step()``. ``bench/`` times :meth:`gradient` directly."""

    def bind(self, model, loss_fn, epochs):
        super().bind(model, loss_fn, epochs)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        return self

    def loss_gradient(self, x, y, epoch):
        """``(mean loss, [grad per parameter])`` at the current weights (zeros for unused parameters)."""
        loss = self.loss_fn(self.model(x), y).mean()
        _check_finite_loss(loss, self.name, epoch)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def gradient_at(self, offsets, x, y, epoch):
        """``grad L(theta + offsets)``, the weights restored afterwards (copied back: bit for bit)."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_add_(self.params, offsets)
        try:
            return self.loss_gradient(x, y, epoch)[1]
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    def ascent(self, grads, radius):
        """SAM's ``radius g / ||g||`` (one norm over all parameters)."""
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch._foreach_mul(grads, radius / (norm + 1e-12))

    def direction(self, x, y, epoch):  # pragma: no cover - abstract
        """``(mean loss at theta, update direction per parameter)``."""
        raise NotImplementedError

    def gradient(self, x, y, epoch=0):
        """Write the update direction into ``.grad`` (replacing it); returns the mean loss at ``theta``."""
        loss, direction = self.direction(x, y, epoch)
        for p, d in zip(self.params, direction):
            p.grad = d.detach()
        return loss

    def step(self, x, y, optimizer, epoch, active=True):
        if not active:
            return super().step(x, y, optimizer, epoch, active=False)
        optimizer.zero_grad(set_to_none=True)
        loss = self.gradient(x, y, epoch)
        optimizer.step()
        return loss


class SAM(_TwoPassRule):
    """SAM (Foret et al. 2021) and, with ``adaptive=True``, ASAM (Kwon et al. 2021)."""

    name = "sam"

    def perturbation(self, grads):
        rho = self.hyper["rho"]
        if not self.hyper["adaptive"]:
            return self.ascent(grads, rho)
        # ASAM: e = rho T^2 g / ||T g||, T = |w| + eta on weights, 1 elsewhere (ASAM's reference code
        # scales the parameters named "weight" only)
        with torch.no_grad():
            scales = [p.abs() + self.hyper["eta"] if n.rsplit(".", 1)[-1] == "weight" else None for n, p in self.named]
            scaled = [g if t is None else t * g for g, t in zip(grads, scales)]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled]))
            return [(g if t is None else t * g) * (rho / (norm + 1e-12)) for g, t in zip(scaled, scales)]

    def direction(self, x, y, epoch):
        loss, grads = self.loss_gradient(x, y, epoch)
        return loss, self.gradient_at(self.perturbation(grads), x, y, epoch)


class GNP(_TwoPassRule):
    """Gradient-norm penalty by finite differences (Zhao et al. 2022, eq. 9)."""

    name = "gnp"

    def direction(self, x, y, epoch):
        loss, grads = self.loss_gradient(x, y, epoch)
        shifted = self.gradient_at(self.ascent(grads, self.hyper["r"]), x, y, epoch)
        a = self.hyper["alpha"]
        return loss, [(1 - a) * g + a * s for g, s in zip(grads, shifted)]


class LookSAM(_TwoPassRule):
    """LookSAM (Liu et al. 2022, Algorithm 1): SAM every ``k`` steps, the stored orthogonal component
    ``g_v`` reused in between, rescaled to the current gradient's norm."""

    name = "looksam"

    def bind(self, model, loss_fn, epochs):
        super().bind(model, loss_fn, epochs)
        k = self.hyper["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"rule 'looksam': k must be an int >= 1 (steps per SAM gradient), got {k!r}")
        self.steps, self.orthogonal = 0, None
        return self

    def direction(self, x, y, epoch):
        loss, grads = self.loss_gradient(x, y, epoch)
        if self.steps % self.hyper["k"] == 0 or self.orthogonal is None:
            sam = self.gradient_at(self.ascent(grads, self.hyper["rho"]), x, y, epoch)
            g_dot_s = sum((g * s).sum() for g, s in zip(grads, sam))
            g_sq = sum(g.square().sum() for g in grads)
            coefficient = g_dot_s / (g_sq + 1e-12)
            self.orthogonal = [s - coefficient * g for g, s in zip(grads, sam)]
            out = sam
        else:
            g_norm = torch.sqrt(sum(g.square().sum() for g in grads))
            v_norm = torch.sqrt(sum(v.square().sum() for v in self.orthogonal))
            scale = self.hyper["alpha"] * g_norm / (v_norm + 1e-12)
            out = [g + scale * v for g, v in zip(grads, self.orthogonal)]
        self.steps += 1
        return loss, out

    def state_dict(self) -> dict:
        return {"steps": self.steps, "orthogonal": None if self.orthogonal is None else [v.detach().cpu() for v in self.orthogonal]}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.steps = int(state["steps"])
            stored = state["orthogonal"]
            self.orthogonal = None if stored is None else [v.to(p.device, p.dtype) for v, p in zip(stored, self.params)]


_CLASSES = {cls.name: cls for cls in (SGD, L2Rule, Curvature, Fisher, SubBatch, Metric, SelectiveL2,
                                      L2Stopped, L2StoppedSelective, SAM, GNP, LookSAM)}
assert tuple(_CLASSES) == RULES


def make_rule(rule: str | Rule, **hyper) -> Rule:
    """A fresh rule object from its name (see :data:`RULES`) and hyperparameter overrides."""
    if isinstance(rule, Rule):
        if hyper:
            raise ValueError("make_rule: hyperparameters given together with a Rule instance; set them on the instance")
        return rule
    if rule not in _CLASSES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
    return _CLASSES[rule](**hyper)
