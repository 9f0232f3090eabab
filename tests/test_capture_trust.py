"""A Capture reused after requires_grad changed, user forward hooks that replace an output, and the
capture's messages: each against a float64 loop of separate per-example forwards."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv


def _loop_sqnorms(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        out.append(sum(g.square().sum() for g in torch.autograd.grad(loss, params)))
    return torch.stack(out)


def _data(B=6, d=5, classes=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (B,), generator=g)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _captured_sqnorms(cap, model, x, y):
    with cap:
        out = model(x)
    return cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))


@pytest.mark.parametrize("direction", ["unfreeze", "freeze"])
def test_capture_reused_after_requires_grad_changed(direction):
    model = _mlp()
    x, y = _data()
    if direction == "unfreeze":  # gradual unfreezing: only the head trains at first
        model[0].requires_grad_(False)
        model[2].requires_grad_(False)
    cap = fastcurv.capture(model)
    torch.testing.assert_close(_captured_sqnorms(cap, model, x, y), _loop_sqnorms(model, x, y))
    if direction == "unfreeze":
        model[2].requires_grad_(True)
    else:
        model[4].requires_grad_(False)  # freeze the head
        model[0].bias.requires_grad_(False)
    torch.testing.assert_close(_captured_sqnorms(cap, model, x, y), _loop_sqnorms(model, x, y))
    assert {n for n, _ in cap.params} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_requires_grad_changed_inside_the_block_is_refused():
    model = _mlp()
    x, y = _data()
    with fastcurv.capture(model) as cap:
        out = model(x)
    model[4].requires_grad_(False)
    with pytest.raises(RuntimeError, match="requires_grad of some parameters changed"):
        cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))


def _scale_output(module, args, output):
    return output * 3.0 + 1.0


@pytest.mark.parametrize("when", ["before", "after"])
def test_user_hook_replacing_an_output(when):
    """The capture records what the layer's parameters produced; the user's replacement is part of
    the graph above it (its factor 3 reaches the delta), wherever the hook was registered."""
    model = _mlp()
    x, y = _data()
    handle = model[2].register_forward_hook(_scale_output) if when == "before" else None
    cap = fastcurv.capture(model)
    with cap:
        if when == "after":
            handle = model[2].register_forward_hook(_scale_output)
        out = model(x)
    got = cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))
    ref = _loop_sqnorms(model, x, y)
    handle.remove()
    torch.testing.assert_close(got, ref)
