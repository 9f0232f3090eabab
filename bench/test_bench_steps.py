"""Training-step cost, in one run:

* ``regstep-*``: one curvature-regularized step (mean l + alpha mean_i ||grad l_i||^2) by fastcurv vs
  torch.func vmap(grad) with create_graph vs a loop over micro-batches of one example, against a plain
  step (the floor).
* ``rules-*``: one step of every learning rule of ``fastcurv.train`` relative to ``sgd``.
* ``hessian-product-step``: the metric / selective_l2 rules (``reg.backward``: one create_graph backward
  and one double backward, data gradient reused) vs the same penalty as a loss term,
  ``(mean l + reg(l)).backward()`` (one more backward of the loss), vs sgd, on the ``rules-mlp`` case.

    python -m pytest bench/test_bench_steps.py --benchmark-only --benchmark-group-by=group
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastcurv
from fastcurv.regularizers import Curvature
from fastcurv.train.loop import per_example_loss
from fastcurv.train.rules import RULES, make_rule
from conftest import sync

ALPHA = 1e-3


def mlp_case(dev, batch=None):
    big = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    width = 1024
    model = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    B = batch or (1024 if big else 256)
    x, y = torch.randn(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g)
    return model.to(dev), x.to(dev), y.to(dev)


def step_plain(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def make_step_fastcurv(model):
    reg = Curvature(model, alpha=ALPHA)

    def step(model, x, y):
        model.zero_grad(set_to_none=True)
        with reg.track():
            out = model(x)
        reg.backward(F.cross_entropy(out, y, reduction="none"))

    return step


def make_step_torch_func(model):
    names = [n for n, _ in model.named_parameters()]

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))

    def step(model, x, y):
        model.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        grads = per_sample(params, x, y)
        penalty = sum(grads[n].reshape(x.shape[0], -1).square().sum(1) for n in names).mean()
        (F.cross_entropy(model(x), y) + ALPHA * penalty).backward()

    return step


def step_microbatch(model, x, y):
    """The exact definition: each example differentiated alone with create_graph."""
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    B = x.shape[0]
    total = F.cross_entropy(model(x), y)
    for i in range(B):
        gi = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params, create_graph=True)
        total = total + ALPHA / B * sum(g.square().sum() for g in gi)
    total.backward()


REGSTEP = {
    "plain_step": lambda model: step_plain,
    "fastcurv": make_step_fastcurv,
    "torch_func": make_step_torch_func,
    "microbatch_loop": lambda model: step_microbatch,
}


@pytest.mark.parametrize("contender", list(REGSTEP))
def test_regularized_step(benchmark, record, dev, contender):
    # The micro-batch loop is B sequential double-backwards: a smaller batch keeps the run short;
    # every contender uses the same batch so the ratios are comparable.
    model, x, y = mlp_case(dev, batch=64 if dev.type == "cpu" else 256)
    record("regstep-mlp", contender=contender, batch=x.shape[0])
    fn = REGSTEP[contender](model)

    def run():
        fn(model, x, y)
        sync(dev)

    benchmark.pedantic(run, rounds=3 if contender == "microbatch_loop" else 10, warmup_rounds=1, iterations=1)


def rules_case(dev):
    big = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    B = 512 if big else 128
    x, y = torch.randn(B, 64, generator=g), torch.randint(0, 10, (B,), generator=g)
    return model.to(dev), x.to(dev), y.to(dev)


@pytest.mark.parametrize("rule", RULES)
def test_rule_step(benchmark, record, dev, rule):
    model, x, y = rules_case(dev)
    record("rules-mlp", rule=rule, batch=x.shape[0])
    loss = "hinge" if rule == "fisher" else "cross_entropy"
    r = make_rule(rule).bind(model, per_example_loss(loss), epochs=10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run():
        r.step(x, y, opt, epoch=0)
        sync(dev)

    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)


def make_loss_term_step(regularizer_class, **hyper):
    """The penalty added to the loss and backpropagated with it: the HVP's create_graph backward, the
    double backward, then a second full backward of the loss."""

    def build(model):
        reg = regularizer_class(model, **hyper)

        def step(model, x, y, optimizer):
            optimizer.zero_grad(set_to_none=True)
            per_example = F.cross_entropy(model(x), y, reduction="none")
            (per_example.mean() + reg(per_example)).backward()
            optimizer.step()

        return step

    return build


def make_rule_step(rule):
    def build(model):
        r = make_rule(rule).bind(model, per_example_loss("cross_entropy"), epochs=10)
        return lambda model, x, y, optimizer: r.step(x, y, optimizer, epoch=0)

    return build


HESSIAN_PRODUCT_STEP = {
    "sgd": make_rule_step("sgd"),
    "metric rule (reg.backward)": make_rule_step("metric"),
    "metric as loss term": make_loss_term_step(fastcurv.regularizers.Metric, lam=0.1),
    "selective_l2 rule (reg.backward)": make_rule_step("selective_l2"),
    "selective_l2 as loss term": make_loss_term_step(fastcurv.regularizers.SelectiveL2, lam=1.0, omega=1e-3),
}


@pytest.mark.parametrize("contender", list(HESSIAN_PRODUCT_STEP))
def test_hessian_product_step(benchmark, record, dev, contender):
    model, x, y = rules_case(dev)
    record("hessian-product-step", contender=contender, batch=x.shape[0])
    step = HESSIAN_PRODUCT_STEP[contender](model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run():
        step(model, x, y, opt)
        sync(dev)

    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)
