"""Flat-minima metrics, one call each: the four of Jia & Su (2020)'s comparison (sec. 7; docs/METHODS.md section 2) and
the empirical-Fisher trace.

* :func:`fisher_logdet`: ``gamma_hat``, their metric (sec. 5.3, eq. 6): mean over random subsets of
  ``ln det`` of the per-example-gradient Gram matrix.
* :func:`robustness`: ``(1/N) sum_i ||J_x f(x_i)||_F^2`` (Sokolic et al.'s input-Jacobian metric).
* :func:`hessian_frobenius`: ``||H||_F^2`` of the loss Hessian (Wu et al.), estimated with Rademacher probes.
* :func:`spectral_radius` / :func:`top_hessian_eigenvalue`: ``rho(H)`` / ``lambda_max(H)`` (Keskar et al.).
* :func:`fisher_trace`: ``(1/N) sum_i ||grad l_i||^2`` (the empirical-Fisher trace, Geng et al.; docs/METHODS.md section 1).

All are "lower is flatter". The paper evaluates the Hessian metrics on sampled subsets of the training
set and averages; pass such a subset (or an iterable of batches) as ``data``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv import curvature
from fastcurv.curvature._operator import check_fixed_function

__all__ = [
    "fisher_logdet",
    "fisher_trace",
    "robustness",
    "hessian_frobenius",
    "spectral_radius",
    "top_hessian_eigenvalue",
    "SingularGramError",
    "gradient_noise_scale",
    "GradientStatistics",
    "grand_scores",
    "el2n_scores",
]


class SingularGramError(ValueError):
    """The per-example-gradient Gram matrix of a subset is singular, so its log-determinant is undefined."""


def _hard_labels(y: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Class indices from hard labels ``[N]`` or soft / one-hot labels ``[N, C]`` (argmax)."""
    if not isinstance(y, torch.Tensor) or y.shape[:1] != (n,):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{what}: expected labels of shape [{n}] or [{n}, C], got {shape}")
    if y.dim() == 1 and not y.is_floating_point():
        return y
    if y.dim() == 2:
        return y.argmax(1)
    raise ValueError(f"{what}: labels must be integer class indices [N] or soft/one-hot labels [N, C], got "
                     f"{y.dtype} of shape {tuple(y.shape)}")


def _check_inputs(model: nn.Module, x: torch.Tensor, what: str) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected inputs x with a non-empty batch dimension, got {shape}")
    # Per-example quantities are meaningless when examples interact (train-mode BatchNorm) or a random mask
    # is drawn per call (dropout), so these metrics have no train-mode opt-in.
    check_fixed_function(model, False, what, can_allow=False)
    return x.shape[0]


def _check_all_captured(cap, model: nn.Module, what: str) -> None:
    """The Gram / norms must cover every trainable parameter; a layer the capture layer skipped would
    make them silently too small."""
    captured = {id(p) for _, p in cap.params}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in captured]
    if missing:
        raise RuntimeError(f"{what}: parameters {missing} are not in any layer the capture layer supports (or "
                           f"their layer was not called), so per-example gradients would be incomplete")


def _per_example_ce(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, what: str) -> torch.Tensor:
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: the model must return logits of shape [N, C] = [{x.shape[0]}, C], "
                         f"got {tuple(logits.shape)}")
    return F.cross_entropy(logits, labels, reduction="none")


def fisher_logdet(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    subset_size: int,
    trials: int,
    seed: int = 0,
    jitter: float = 0.0,
) -> float:
    """``gamma_hat = (1/trials) sum_t ln det G_{S_t}`` (Jia & Su 2020, eq. 5-6).

    For each trial a subset ``S_t`` of ``subset_size`` examples (N' in the paper) is drawn without
    replacement from ``x`` (seeded by ``seed``, on the CPU). ``G_{S_t}[i, j] = <grad l_i, grad l_j>`` is the
    Gram matrix of the per-example gradients of the cross-entropy ``l_i`` with the given labels (hard
    labels ``[N]``; soft or one-hot ``[N, C]`` are turned into their argmax), computed from captured
    activations and deltas (``cap.per_example_gram``), never the ``N' x P`` Jacobian. ``ln det`` is taken
    in float64 as the sum of the logarithms of ``G``'s eigenvalues, with ``G`` itself computed on a float64
    copy of the model (so that small eigenvalues of well-fitted examples are resolved). The model must be in eval mode (no dropout, no batch statistics).

    ``G`` is singular when ``subset_size > P`` or when per-example gradients are linearly dependent (e.g.
    examples fitted to ~zero loss, or duplicated examples). Singularity is decided by rank, relative to
    ``G``'s scale and the precision it was computed in: an eigenvalue ``<= subset_size * eps * lambda_max``
    counts as zero. It raises :class:`SingularGramError` (always when ``subset_size > P``) unless
    ``jitter > 0``, which adds
    ``jitter * mean(diag G) * I`` before the determinant (a relative ridge; it biases ``gamma_hat``, so
    compare models only at equal ``jitter``).
    """
    n = _check_inputs(model, x, "fisher_logdet")
    labels = _hard_labels(y, n, "fisher_logdet")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or not 1 <= subset_size <= n:
        raise ValueError(f"fisher_logdet: subset_size must be an integer in [1, N = {n}], got {subset_size!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"fisher_logdet: trials must be a positive integer, got {trials!r}")
    if not jitter >= 0:
        raise ValueError(f"fisher_logdet: jitter must be >= 0, got {jitter!r}")
    from fastcurv.capture import capture

    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if subset_size > num_params and jitter == 0:
        raise SingularGramError(
            f"fisher_logdet: subset_size = {subset_size} examples vs P = {num_params} parameters: the Gram "
            f"matrix has rank <= P < subset_size, so it is singular for every subset. Use subset_size <= "
            f"{num_params}, or pass jitter > 0 (adds jitter * mean(diag) * I)."
        )
    generator = torch.Generator().manual_seed(seed)
    # G on a float64 copy: in float32 the eigenvalues of well-fitted examples (tiny gradients) fall below
    # the rounding floor n * eps * lambda_max and every fitted minimum would look singular.
    model64, x64 = _float64_copy(model), (x.double() if x.is_floating_point() else x)
    total = 0.0
    for t in range(trials):
        idx = torch.randperm(n, generator=generator)[:subset_size].to(x.device)
        try:
            with capture(model64) as cap:
                losses = _per_example_ce(model64, x64[idx], labels[idx], "fisher_logdet")
                gram = cap.per_example_gram(losses).detach()
        except RuntimeError as exc:
            if model64 is model or "dtype" not in str(exc):
                raise
            # the forward casts (x.float()), so a float64 copy cannot run: G in the model's own precision
            # (the singularity tolerance below follows that precision)
            warnings.warn(f"fisher_logdet: the model's forward does not run in float64 ({exc}); computing G in "
                          f"{next(model.parameters()).dtype} instead", RuntimeWarning, stacklevel=2)
            model64, x64 = model, x
            with capture(model64) as cap:
                losses = _per_example_ce(model64, x64[idx], labels[idx], "fisher_logdet")
                gram = cap.per_example_gram(losses).detach()
        _check_all_captured(cap, model64, "fisher_logdet")
        computed_in = gram.dtype
        gram = gram.double()
        if jitter > 0:
            gram = gram + jitter * gram.diagonal().mean() * torch.eye(subset_size, dtype=gram.dtype, device=gram.device)
        total += _logdet_if_full_rank(gram, computed_in, t, subset_size, num_params)
    return total / trials


def _float64_copy(model: nn.Module) -> nn.Module:
    import copy

    if all(t.dtype == torch.float64 for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()):
        return model
    return copy.deepcopy(model).double()


def _logdet_if_full_rank(gram: torch.Tensor, computed_in: torch.dtype, trial: int, subset_size: int,
                         num_params: int) -> float:
    """``ln det gram`` from its eigenvalues, or :class:`SingularGramError` when it is numerically singular.

    A Gram matrix is PSD; computed in ``computed_in`` it carries rounding errors of about
    ``n * eps * lambda_max``, so an eigenvalue below that tolerance (the rule of ``numpy.linalg.matrix_rank``)
    is indistinguishable from zero and its logarithm would be noise (e.g. -253 for an exactly singular
    matrix, depending on rounding).
    """
    eigenvalues = torch.linalg.eigvalsh(gram)
    largest = eigenvalues[-1].item()
    tolerance = subset_size * torch.finfo(computed_in).eps * max(largest, 0.0)
    rank = int((eigenvalues > tolerance).sum())
    if rank < subset_size or not largest > 0:
        raise SingularGramError(
            f"fisher_logdet: the per-example-gradient Gram matrix of trial {trial} is numerically singular "
            f"(rank {rank} of {subset_size}: {subset_size - rank} eigenvalue(s) <= {tolerance:.3g} = n * eps("
            f"{computed_in}) * lambda_max); subset_size = {subset_size} examples vs P = {num_params} parameters "
            f"(rank <= min of the two), and examples with ~zero loss or duplicated examples give dependent "
            f"gradients. Use a smaller subset_size, or pass jitter > 0 (adds jitter * mean(diag) * I)."
        )
    return eigenvalues.log().sum().item()


def fisher_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """``(1/N) sum_i ||grad_theta l_i||^2`` with ``l_i`` the cross-entropy of example ``i`` (labels as in
    :func:`fisher_logdet`): the trace of the empirical Fisher, from per-example squared norms of captured
    activations and deltas. ``batch_size`` bounds how many examples go through the model at once."""
    n = _check_inputs(model, x, "fisher_trace")
    labels = _hard_labels(y, n, "fisher_trace")
    step = n if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"fisher_trace: batch_size must be >= 1, got {batch_size!r}")
    from fastcurv.capture import capture

    total = 0.0
    for start in range(0, n, step):
        with capture(model) as cap:
            losses = _per_example_ce(model, x[start : start + step], labels[start : start + step], "fisher_trace")
            total += cap.per_example_sqnorms(losses).detach().double().sum().item()
        _check_all_captured(cap, model, "fisher_trace")
    return total / n


def robustness(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> float:
    """``(1/N) sum_i ||J_x f(x_i)||_F^2``, the squared Frobenius norm of the input-output Jacobian, averaged.

    One forward per batch and one backward batched over the ``C`` output coordinates
    (``is_grads_batched``): because examples do not interact in eval mode, the gradient of
    ``sum_i f_c(x_i)`` w.r.t. ``x`` holds every example's row ``c`` of its Jacobian at once. Cost is about
    ``C`` backward passes (vmapped), memory ``C`` times one input gradient; use ``batch_size`` to bound it.
    (Jia & Su (2020) write ``||J||_2^2``; this is the Frobenius form, as in Sokolic et al.'s regularizer.)
    """
    n = _check_inputs(model, x, "robustness")
    if not x.is_floating_point():
        raise TypeError(f"robustness: inputs must be floating point to differentiate, got {x.dtype}")
    step = n if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"robustness: batch_size must be >= 1, got {batch_size!r}")
    total = 0.0
    for start in range(0, n, step):
        xb = x[start : start + step].detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(xb)
            if out.dim() == 0 or out.shape[0] != xb.shape[0]:
                raise ValueError(f"robustness: the model must return outputs with batch dimension {xb.shape[0]}, "
                                 f"got {tuple(out.shape)}")
            flat = out.reshape(xb.shape[0], -1)
            C = flat.shape[1]
            if not flat.requires_grad:  # output independent of the input
                continue
            # Selector c: all-ones in column c of every example, batched over c.
            selectors = torch.eye(C, dtype=flat.dtype, device=flat.device)[:, None, :].expand(C, xb.shape[0], C)
            (jac,) = torch.autograd.grad(flat, xb, grad_outputs=selectors, is_grads_batched=True, allow_unused=True,
                                         materialize_grads=True)
        total += jac.double().square().sum().item()
    return total / n


def hessian_frobenius(
    model: nn.Module,
    loss_fn,
    data,
    num_probes: int = 64,
    seed: int = 0,
    params=None,
    probe_batch_size: int = 32,
    return_stderr: bool = False,
    allow_train_mode: bool = False,
):
    """``||H||_F^2`` (the squared Frobenius norm, as in Jia & Su (2020)'s comparison) of the Hessian of the mean
    loss over ``data`` (see :class:`fastcurv.curvature.Hessian`), estimated as ``E ||H z||^2`` over
    ``num_probes`` Rademacher probes. ``return_stderr=True`` also returns the estimate's standard error.
    ``allow_train_mode``: as for :class:`~fastcurv.curvature.Hessian`."""
    H = curvature.Hessian(model, loss_fn, data, params, allow_train_mode=allow_train_mode)
    return curvature.frobenius_sq(H, num_probes=num_probes, seed=seed, probe_batch_size=probe_batch_size,
                                  return_stderr=return_stderr)


def spectral_radius(model: nn.Module, loss_fn, data, tol: float = 1e-4, max_iter: int | None = None,
                    method: str = "lanczos", seed: int = 0, params=None, allow_train_mode: bool = False) -> float:
    """``rho(H) = max |lambda(H)|`` of the Hessian of the mean loss over ``data`` (Lanczos by default);
    ``allow_train_mode`` as for :class:`~fastcurv.curvature.Hessian`."""
    H = curvature.Hessian(model, loss_fn, data, params, allow_train_mode=allow_train_mode)
    return curvature.spectral_radius(H, tol=tol, max_iter=max_iter, method=method, seed=seed)


def top_hessian_eigenvalue(model: nn.Module, loss_fn, data, tol: float = 1e-4, max_iter: int | None = None,
                           method: str = "lanczos", seed: int = 0, params=None,
                           allow_train_mode: bool = False) -> float:
    """``lambda_max(H)``, the largest algebraic eigenvalue of the Hessian of the mean loss over ``data``
    (equal to the spectral radius at a minimum, where ``H`` is positive semi-definite);
    ``allow_train_mode`` as for :class:`~fastcurv.curvature.Hessian`."""
    H = curvature.Hessian(model, loss_fn, data, params, allow_train_mode=allow_train_mode)
    values, _ = curvature.top_eigenvalues(H, k=1, tol=tol, max_iter=max_iter, which="LA", method=method, seed=seed)
    return values[0].item()


# ------------------------------------------------------------------ per-example training statistics
def _per_example_losses(model, loss_fn, x, y, what):
    losses = loss_fn(model(x), y) if loss_fn is not None else _per_example_ce(model, x, _hard_labels(y, x.shape[0], what), what)
    if not isinstance(losses, torch.Tensor) or losses.shape[:1] != (x.shape[0],):
        raise ValueError(f"{what}: loss_fn(output, y) must return per-example losses of shape [{x.shape[0]}] "
                         f"(reduction='none'), got {getattr(losses, 'shape', type(losses).__name__)}")
    return losses.reshape(x.shape[0], -1).mean(1)


class GradientStatistics:
    """Running sums behind :func:`gradient_noise_scale` and the GraNd summary, batch by batch: what
    :func:`gradient_noise_scale` computes over a data set and ``fit(statistics=...)`` over an epoch's steps.

    :meth:`add` takes one batch's per-example squared norms by layer and the gradient of the batch's summed
    loss, as :meth:`fastcurv.capture.Capture.per_example_sqnorms_and_gradient` returns them (one backward). In a
    ``torch.distributed`` process group every process adds its shard of the same batch: one all-reduce per
    batch (counts, norm sums and the gradient; one more for the largest norm) makes the numbers those of the
    whole batch.
    """

    def __init__(self, model: nn.Module, what: str = "gradient statistics"):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.what = what
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._totals: dict[str, list[float]] = {}  # key -> [sum of |G|^2 estimates, sum of tr(Sigma) estimates]
        self.batches = 0
        self.examples = 0
        self._norm_sum = self._sq_sum = 0.0
        self._norm_max = 0.0

    def add(self, cap, by_layer: dict[str, torch.Tensor], grads) -> None:
        """One batch: ``by_layer`` ``{layer: [n]}`` per-example squared norms, ``grads`` the gradient of the
        sum of the batch's per-example losses per parameter (None = zero), ``cap`` the capture they came from."""
        _check_all_captured(cap, cap.model, self.what)
        params = self.params
        device = params[0].device
        groups = {layer.name: [self._index[id(p)] for _, p in layer.params if id(p) in self._index] for layer in cap.layers}
        names = list(by_layer)
        per_example = sum(by_layer.values()).detach().double().clamp_min(0)
        norms = per_example.sqrt()
        # [count, sum_i |g_i|^2 per layer..., sum_i |g_i|, gradient sums...]
        flat = torch.cat([torch.tensor([float(per_example.shape[0])], dtype=torch.float64, device=device),
                          torch.stack([by_layer[k].detach().double().sum() for k in names]),
                          norms.sum().reshape(1),
                          *[(g if g is not None else torch.zeros_like(p)).detach().double().reshape(-1)
                            for g, p in zip(grads, params)]])
        largest = norms.max() if norms.numel() else torch.zeros((), dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        B = flat[0].item()
        if B < 2:
            raise ValueError(f"{self.what}: every batch needs >= 2 examples (got {int(B)}): the estimators "
                             "contrast per-example and batch gradients")
        layer_sums = flat[1:1 + len(names)]
        self.examples += int(B)
        self._sq_sum += layer_sums.sum().item()
        self._norm_sum += flat[1 + len(names)].item()
        self._norm_max = max(self._norm_max, largest.item())
        batch_grad = flat[2 + len(names):] / B
        offsets, start = [], 0
        for p in params:
            offsets.append((start, start + p.numel()))
            start += p.numel()
        squares = [batch_grad[a:b].square().sum().item() for a, b in offsets]
        sq_means = dict(zip(names, (layer_sums / B).tolist()))
        # Cross terms of shared parameters ("shared:<param>") belong to the overall statistics only.
        entries = {"": (sum(sq_means.values()), sum(squares)),
                   **{k: (sq_means[k], sum(squares[i] for i in groups[k])) for k in names if k in groups}}
        for key, (small, big) in entries.items():
            acc = self._totals.setdefault(key, [0.0, 0.0])
            acc[0] += (B * big - small) / (B - 1)  # |G|^2, unbiased (McCandlish et al., appendix A.1)
            acc[1] += (small - big) / (1 - 1 / B)  # tr(Sigma), unbiased
        self.batches += 1

    def _summary(self, key: str) -> dict:
        grad_sq, trace_cov = self._totals[key][0] / self.batches, self._totals[key][1] / self.batches
        return {"noise_scale": trace_cov / grad_sq if grad_sq != 0 else float("inf"),
                "trace_covariance": trace_cov, "grad_sq_norm": grad_sq}

    def noise_scale(self) -> dict:
        """``{"noise_scale", "trace_covariance", "grad_sq_norm", "batches", "by_layer": {layer: {...}}}``: the
        averages over the added batches, ratio taken last (see :func:`gradient_noise_scale`)."""
        if not self.batches:
            raise ValueError(f"{self.what}: no batch was added")
        result = self._summary("")
        result["batches"] = self.batches
        result["by_layer"] = {k: self._summary(k) for k in self._totals if k}
        return result

    def grand(self) -> dict:
        """``{"mean", "std", "max"}`` of the GraNd scores ``||grad l_i||`` of every example added."""
        if not self.examples:
            raise ValueError(f"{self.what}: no batch was added")
        mean = self._norm_sum / self.examples
        return {"mean": mean, "std": max(self._sq_sum / self.examples - mean * mean, 0.0) ** 0.5, "max": self._norm_max}


def gradient_noise_scale(model: nn.Module, data, loss_fn=None) -> dict:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, "An Empirical
    Model of Large-Batch Training", eq. 2.8 and appendix A.1), overall and per layer.

    ``data``: one ``(x, y)`` batch or an iterable of batches (each of >= 2 examples). Per batch of ``B``
    examples, from the per-example squared norms ``|g_i|^2`` (captured activations and deltas) and the batch
    gradient ``G_B = mean_i g_i`` (the same backward): the unbiased estimators of their appendix A.1 with
    ``B_small = 1`` and ``B_big = B``: ``|G|^2 ~ (B |G_B|^2 - mean_i |g_i|^2) / (B - 1)`` and
    ``tr(Sigma) ~ (mean_i |g_i|^2 - |G_B|^2) / (1 - 1/B)``. Both are averaged over batches before the
    ratio is taken (the ratio of averages, as they recommend; a ratio per batch is biased). ``loss_fn(out,
    y)`` returns per-example losses (default: cross-entropy of the labels). In a ``torch.distributed``
    process group, each process passes its shard of the same batches: the sums over examples and the batch
    gradient are all-reduced, so the statistics are those of the whole batch.

    Returns ``{"noise_scale", "trace_covariance", "grad_sq_norm", "batches", "by_layer": {layer: {...}}}``.
    ``grad_sq_norm`` is unbiased, so from few small batches it can come out negative (the gradient is
    smaller than its noise): ``noise_scale`` is then negative too, meaning "average over more batches".
    """
    from fastcurv.capture import capture
    from fastcurv.curvature._operator import BatchSource

    stats = GradientStatistics(model, "gradient_noise_scale")
    for x, y, n in BatchSource(data, stats.params[0].device, "gradient_noise_scale"):
        _check_inputs(model, x, "gradient_noise_scale")
        with torch.enable_grad(), capture(model) as cap:
            losses = _per_example_losses(model, loss_fn, x, y, "gradient_noise_scale")
        stats.add(cap, *cap.per_example_sqnorms_and_gradient(losses, stats.params))
    return stats.noise_scale()


def grand_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None, batch_size: int | None = None) -> torch.Tensor:
    """GraNd scores (Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet"): ``||grad_theta l_i||``
    per example ``[N]``, from captured per-example squared norms (no per-example gradients). The paper
    averages them over several early-training initializations; call this once per model and average.
    ``loss_fn(out, y)``: per-example losses (default: cross-entropy of the labels)."""
    from fastcurv.capture import capture

    n = _check_inputs(model, x, "grand_scores")
    step = n if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"grand_scores: batch_size must be >= 1, got {batch_size!r}")
    scores = []
    for start in range(0, n, step):
        with torch.enable_grad(), capture(model) as cap:
            losses = _per_example_losses(model, loss_fn, x[start:start + step], y[start:start + step], "grand_scores")
            scores.append(cap.per_example_sqnorms(losses).detach().clamp_min(0).sqrt())
        _check_all_captured(cap, model, "grand_scores")
    return torch.cat(scores)


@torch.no_grad()
def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N scores (Paul et al. 2021): ``||softmax(f(x_i)) - onehot(y_i)||_2`` per example ``[N]``, from the
    logits alone (labels as in :func:`fisher_logdet`)."""
    n = _check_inputs(model, x, "el2n_scores")
    labels = _hard_labels(y, n, "el2n_scores")
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"el2n_scores: the model must return logits of shape [N, C] = [{n}, C], got {tuple(logits.shape)}")
    return (logits.softmax(1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)).norm(dim=1)
