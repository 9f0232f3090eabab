"""Per-epoch training statistics for ``fit(statistics=...)``: the gradient noise scale (overall and per layer) and a
GraNd summary, from the per-example squared norms and the batch gradient of every training step."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["STATISTICS", "StepStatistics"]

STATISTICS = ("noise_scale", "grand")


class StepStatistics:
    """Collects :class:`fastcurv.metrics.GradientStatistics` over an epoch's steps.

    Rules whose step is the plain one (``sgd``, ``l2``, ``l2_stopped``) run their forward under a capture and
    take the data gradient from :meth:`backward`: one backward gives the gradient and the deltas, so the
    statistics cost the forward hooks and ``O(B (d_in + d_out))`` per layer, nothing more (the capture keeps
    the graph until the step's penalty is backpropagated). Other rules run their own forwards and backwards
    (perturbed weights, double backward); for them :meth:`measure` makes one captured forward and backward
    at the weights the step starts from (about the cost of a plain step), with the random state forked so
    that dropout masks drawn there do not change the run.
    """

    def __init__(self, model: nn.Module, loss_fn, names):
        from fastcurv.metrics import GradientStatistics

        self.model, self.loss_fn, self.names = model, loss_fn, tuple(names)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._new = lambda: GradientStatistics(model, "fit(statistics=...)")
        self.stats = self._new()
        self._cap = None

    @contextlib.contextmanager
    def capturing(self):
        """The step's forward, recorded."""
        from fastcurv.capture import capture

        with capture(self.model) as cap:
            yield
        self._cap = cap

    def backward(self, per_example: torch.Tensor) -> None:
        """Sets ``p.grad`` to the gradient of ``per_example.mean()`` (None where unused) and records the batch."""
        n = per_example.shape[0]
        grads = self._record(per_example)
        for p, g in zip(self.params, grads):
            if g is not None:
                p.grad = g / n if p.grad is None else p.grad + g / n

    def measure(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Records the batch with a captured forward and backward of its own (parameters' ``.grad`` untouched)."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with self.capturing():
                out = self.model(x)
            self._record(self.loss_fn(out, y))

    def _record(self, per_example: torch.Tensor) -> list:
        cap, self._cap = self._cap, None
        try:
            by_layer, grads = cap.per_example_sqnorms_and_gradient(per_example, self.params)
            self.stats.add(cap, by_layer, grads)
        finally:
            cap.clear()  # the retained graph lives on in the losses until the step's backward is done
        return grads

    def epoch_record(self) -> dict:
        """The epoch's entries (then starts over): ``noise_scale``, ``trace_covariance``, ``grad_sq_norm`` and
        ``noise_scale.<layer>`` per layer; ``grand_mean``, ``grand_std``, ``grand_max``."""
        record = {}
        if self.stats.batches:
            if "noise_scale" in self.names:
                result = self.stats.noise_scale()
                record.update(noise_scale=result["noise_scale"], trace_covariance=result["trace_covariance"],
                              grad_sq_norm=result["grad_sq_norm"])
                record.update({f"noise_scale.{layer}": v["noise_scale"] for layer, v in result["by_layer"].items()})
            if "grand" in self.names:
                record.update({f"grand_{k}": v for k, v in self.stats.grand().items()})
        self.stats = self._new()
        return record
