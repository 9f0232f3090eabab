"""Data uncertainty: the same curvature estimate on R disjoint batches of data, with its mean, standard error and
spread. The error bars of :func:`trace`, :func:`frobenius_sq` and :func:`spectral_density` cover the random probes
only; this one covers the data the operator is built on (PyHessian issue #5: a ResNet's top eigenvalue from
159 to 1587 across 128-example batches)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fastcurv.curvature._operator import batch_size
from fastcurv.curvature.density import spectral_density
from fastcurv.curvature.eigen import top_eigenvalues
from fastcurv.curvature.estimators import frobenius_sq, trace

__all__ = ["over_batches", "BatchEstimates", "ESTIMATORS", "disjoint_batches"]

ESTIMATORS = ("top_eigenvalues", "trace", "frobenius_sq", "density_moments")


@dataclass(frozen=True)
class BatchEstimates:
    """The result of :func:`over_batches`: ``R`` batches, ``m`` quantities (the ``k`` eigenvalues, one trace...).

    ``values [R, m]`` (float64): each batch's estimate. ``mean``, ``stderr``, ``std``, ``min``, ``max`` (``[m]``):
    over the batches; ``stderr = std / sqrt(R)`` (``std`` with Bessel's correction) is the standard error of
    ``mean`` as an estimate of the expected value of the estimate on a batch of this size (``inf`` for R = 1);
    ``std`` is how far one batch's estimate typically lies from it (the spread a single-batch measurement
    has), ``min``/``max`` its range. ``within_batch [R, m]``: each batch's own error bar where the estimator has
    one (the standard error over probes for trace, frobenius_sq and the density moments; the residual bound
    ``residual * |lambda_max|`` for eigenvalues), else None. ``batch_sizes``: examples per batch.
    """

    estimator: str
    values: torch.Tensor
    within_batch: torch.Tensor | None
    batch_sizes: list[int]
    labels: list[str]

    @property
    def num_batches(self) -> int:
        return self.values.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.values.mean(0)

    @property
    def std(self) -> torch.Tensor:
        if self.num_batches < 2:
            return torch.full_like(self.values[0], math.inf)
        return self.values.std(0, correction=1)

    @property
    def stderr(self) -> torch.Tensor:
        return self.std / math.sqrt(self.num_batches)

    @property
    def min(self) -> torch.Tensor:
        return self.values.min(0).values

    @property
    def max(self) -> torch.Tensor:
        return self.values.max(0).values

    def summary(self) -> list[str]:
        """One line per quantity: ``label: mean ± stderr (std s, min .. max) over R batches of n``."""
        sizes = sorted(set(self.batch_sizes))
        of = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        return [f"{label}: {m:.6g} ± {se:.2g} (std {sd:.2g}, {lo:.6g} .. {hi:.6g}) over {self.num_batches} batches of {of}"
                for label, m, se, sd, lo, hi in zip(self.labels, self.mean.tolist(), self.stderr.tolist(),
                                                     self.std.tolist(), self.min.tolist(), self.max.tolist())]


def disjoint_batches(x, y, num_batches: int, examples_per_batch: int | None = None) -> list[tuple]:
    """``num_batches`` disjoint consecutive ``(x, y)`` slices of ``examples_per_batch`` examples each (default
    ``N // num_batches``); shuffle ``x, y`` first if their order is not random."""
    n = batch_size(x)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"disjoint_batches: num_batches must be a positive integer, got {num_batches!r}")
    size = n // num_batches if examples_per_batch is None else examples_per_batch
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size * num_batches > n:
        raise ValueError(f"disjoint_batches: {num_batches} disjoint batches of {size} examples need "
                         f"{num_batches * size if isinstance(size, int) else '?'} examples, the data has {n}")
    return [(x[r * size:(r + 1) * size], y[r * size:(r + 1) * size]) for r in range(num_batches)]


def _estimate(op, estimator, seed: int, options: dict):
    """``(values [m], within-batch errors [m] or None, labels)`` of one batch's operator."""
    if callable(estimator):
        value = torch.as_tensor(estimator(op), dtype=torch.float64).reshape(-1).cpu()
        return value, None, [f"value {i}" for i in range(value.numel())] if value.numel() > 1 else ["value"]
    if estimator == "top_eigenvalues":
        opts = {"k": 1, "which": "LA", "progress": False, **options}
        values, _, info = top_eigenvalues(op, seed=seed, return_info=True, **opts)
        values = values.double().cpu()
        bound = torch.tensor(info.residuals, dtype=torch.float64) * values.abs().max()
        return values, bound, [f"eigenvalue {i + 1}" for i in range(values.numel())]
    if estimator in ("trace", "frobenius_sq"):
        fn = trace if estimator == "trace" else frobenius_sq
        value, stderr = fn(op, seed=seed, return_stderr=True, **{"progress": False, **options})
        return torch.tensor([value], dtype=torch.float64), torch.tensor([stderr], dtype=torch.float64), [estimator]
    if estimator == "density_moments":
        options = dict(options)
        moments = options.pop("moments", (1, 2))
        density = spectral_density(op, seed=seed, **{"progress": False, **options})
        pairs = [density.moment(k) for k in moments]
        return (torch.tensor([p[0] for p in pairs], dtype=torch.float64),
                torch.tensor([p[1] for p in pairs], dtype=torch.float64), [f"moment {k}" for k in moments])
    raise ValueError(f"over_batches: estimator must be one of {ESTIMATORS} or a callable op -> number(s), "
                     f"got {estimator!r}")


def over_batches(
    make_operator: Callable,
    batches,
    estimator="top_eigenvalues",
    *,
    num_batches: int | None = None,
    examples_per_batch: int | None = None,
    seed: int = 0,
    **options,
) -> BatchEstimates:
    """One curvature estimate on each of ``R`` disjoint data batches, with mean, standard error and spread.

    Args:
        make_operator: ``batch -> operator``, e.g. ``lambda b: Hessian(model, F.cross_entropy, b)`` (any
            operator of :mod:`fastcurv.curvature`; ``batch`` is passed as given, so it may itself be an
            iterable of mini-batches).
        batches: a sequence of ``R`` batches, or one ``(x, y)`` pair together with ``num_batches=R``: then
            ``R`` disjoint consecutive slices of ``examples_per_batch`` examples (default ``N // R``, see
            :func:`disjoint_batches`).
        estimator: ``"top_eigenvalues"`` (options of :func:`top_eigenvalues`; default ``k=1, which="LA"``),
            ``"trace"`` (of :func:`trace`), ``"frobenius_sq"``, ``"density_moments"`` (``moments=(1, 2)``:
            ``(1/P) tr(A^k)`` from :func:`spectral_density`, whose other options pass through), or a callable
            ``operator -> number or 1-D tensor``.
        seed: batch ``r``'s estimator runs with seed ``seed + r``: independent probes per batch, so the
            spread over batches includes the probes' randomness and ``stderr`` stays honest for the mean.
        **options: passed to the estimator.

    Returns a :class:`BatchEstimates`. ``R >= 2`` gives finite standard errors; the batches should be
    disjoint and of equal size (the mean over batches of a nonlinear estimate such as the top eigenvalue is
    the expected value *at that batch size*, which is larger than the eigenvalue on all the data together).
    """
    if num_batches is not None:
        if not (isinstance(batches, (tuple, list)) and len(batches) == 2 and isinstance(batches[0], torch.Tensor)):
            raise TypeError("over_batches: num_batches= splits one (x, y) pair; pass batches=(x, y)")
        batches = disjoint_batches(batches[0], batches[1], num_batches, examples_per_batch)
    elif examples_per_batch is not None:
        raise ValueError("over_batches: examples_per_batch needs num_batches")
    batches = list(batches)
    if not batches:
        raise ValueError("over_batches: no batches")
    if isinstance(estimator, str) and estimator not in ESTIMATORS:
        raise ValueError(f"over_batches: estimator must be one of {ESTIMATORS} or a callable op -> number(s), "
                         f"got {estimator!r}")
    if callable(estimator) and options:
        raise TypeError(f"over_batches: options {sorted(options)} are for a named estimator; bind them into the callable")
    rows, errors, sizes, labels = [], [], [], None
    for r, batch in enumerate(batches):
        values, error, labels = _estimate(make_operator(batch), estimator, seed + r, options)
        if rows and values.shape != rows[0].shape:
            raise ValueError(f"over_batches: batch {r}'s estimate has {values.numel()} values, batch 0's had "
                             f"{rows[0].numel()}")
        rows.append(values)
        errors.append(error)
        sizes.append(_examples(batch))
    within = None if errors[0] is None else torch.stack(errors)
    name = estimator if isinstance(estimator, str) else getattr(estimator, "__name__", "custom")
    return BatchEstimates(estimator=name, values=torch.stack(rows), within_batch=within, batch_sizes=sizes,
                          labels=labels)


def _examples(batch) -> int:
    """Examples in a batch given to ``make_operator``: one ``(x, y)`` pair, or an iterable of them."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch_size(batch[0])
    if isinstance(batch, Iterator):
        return -1  # a one-shot iterator: the operator consumed it
    try:
        return sum(batch_size(x) for x, _ in batch)
    except (TypeError, ValueError):
        return -1  # unknown (e.g. a one-shot iterator, consumed by the operator)
