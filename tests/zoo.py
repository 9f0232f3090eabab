"""The float64 per-example oracle shared by the coverage tests: a loop of ``autograd.grad(l_i)``
over one full-batch forward (exact whenever it is defined, including examples coupled through
batch statistics), and the penalty gradient through it with ``create_graph=True``."""
from __future__ import annotations

import torch


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def loop_grads(losses, params, create_graph=False):
    """``[B, P]``: row i is ``grad l_i`` over ``params`` (flattened, model order)."""
    rows = []
    for i in range(losses.shape[0]):
        g = torch.autograd.grad(losses[i], params, retain_graph=True, create_graph=create_graph, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten() for gi, p in zip(g, params)]))
    return torch.stack(rows)


def check_against_loop(model, forward, loss_fn, *, capture_kwargs=None, penalty=True, atol=1e-9, rtol=1e-7):
    """Norms, Gram and (optionally) the penalty gradient of ``fastcurv.capture`` against the loop.

    ``forward(model)`` runs the model and returns its output; ``loss_fn(out)`` the per-example losses.
    Model and inputs must be float64."""
    import fastcurv

    capture_kwargs = capture_kwargs or {}
    params = [p for _, p in trainable(model)]
    # the oracle
    losses = loss_fn(forward(model))
    G = loop_grads(losses, params)
    ref_sq, ref_gram = G.square().sum(1), G @ G.T
    # fastcurv
    with fastcurv.capture(model, **capture_kwargs) as cap:
        out = forward(model)
    losses = loss_fn(out)
    torch.testing.assert_close(cap.per_example_sqnorms(losses), ref_sq, atol=atol, rtol=rtol)
    torch.testing.assert_close(cap.per_example_gram(losses), ref_gram, atol=atol, rtol=rtol)
    by_layer = cap.per_example_sqnorms_by_layer(losses)
    torch.testing.assert_close(sum(by_layer.values()), ref_sq, atol=atol, rtol=rtol)
    if penalty:
        sq = cap.per_example_sqnorms(losses, create_graph=True)
        got = torch.autograd.grad(sq.mean(), params, allow_unused=True)
        losses2 = loss_fn(forward(model))
        ref_pen = loop_grads(losses2, params, create_graph=True).square().sum(1).mean()
        want = torch.autograd.grad(ref_pen, params, allow_unused=True)
        for (name, _), g, w in zip(trainable(model), got, want):
            g = torch.zeros_like(w) if g is None else g
            w = torch.zeros_like(g) if w is None else w
            torch.testing.assert_close(g, w, atol=atol * 10, rtol=rtol * 10, msg=f"penalty gradient of {name}")
    cap.clear()
    return by_layer

