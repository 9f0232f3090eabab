"""Training-step cost, in one run:

* ``regstep-{mlp,cnn,resnet18}``: one curvature-regularized step (mean l + alpha mean_i ||grad l_i||^2)
  by fastcurv against a plain step (the floor) and what users run instead for a gradient-norm penalty:
  SAM and GNP (bench/_peers.py, two forward+backward passes each, approximations of a different
  penalty); on the MLP also torch.func vmap(grad) with create_graph and a loop over micro-batches.
  ResNet-18: 32x32, B=64, BatchNorm in eval mode.
* ``subbatch-{mlp,cnn,resnet18}``: one step of R_alpha (paper 001, M=8, ``SubBatchGradNorm.backward``)
  against an sgd step; ResNet-18 with BatchNorm in train mode (per-sub-batch statistics).
* ``rules-*``: one step of every learning rule of ``fastcurv.train`` relative to ``sgd``.
* ``hessian-product-step``: the metric / selective_l2 rules (``reg.backward``: one create_graph backward
  and one double backward, data gradient reused) vs the same penalty as a loss term,
  ``(mean l + reg(l)).backward()`` (one more backward of the loss), vs sgd, on the ``rules-mlp`` case.

Every benchmark also records the peak memory of its step next to the plain step's in extra_info
(``peak_mem_MiB``, ``plain_peak_mem_MiB``, ``peak_mem_vs_plain``; see ``conftest.peak_memory_bytes``).

    python -m pytest bench/test_bench_steps.py --benchmark-only --benchmark-group-by=group
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import fastcurv
from fastcurv.models import resnet18
from fastcurv.regularizers import Curvature, SubBatchGradNorm
from fastcurv.train.loop import per_example_loss
from fastcurv.train.rules import RULES, make_rule
from _peers import GNP_ALPHA, GNP_R, SAM_RHO, make_gnp_step, make_sam_step
from conftest import memory_next_to_plain, sync
from test_bench_norms import cnn

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


def image_case(name, dev, batch=64, train_batchnorm=False):
    """The small CNN of the norms benchmark or ResNet-18 (width 64), 32x32 inputs, 10 classes."""
    g = torch.Generator().manual_seed(0)
    model = cnn(dev.type == "cuda") if name == "cnn" else resnet18()
    model.train(train_batchnorm)  # BatchNorm: eval mode (running statistics) unless asked
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model.to(dev), x.to(dev), y.to(dev)


def step_case(name, dev, train_batchnorm=False):
    if name == "mlp":
        return mlp_case(dev, batch=64 if dev.type == "cpu" else 256)
    return image_case(name, dev, batch=64 if dev.type == "cpu" else 256, train_batchnorm=train_batchnorm)


def _perturbed_grad(model, x, y, grad, radius):
    """grad L(w + radius g/||g||) by torch.func, without touching the model: the peers' oracle."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    norm = torch.sqrt(sum(g.square().sum() for g in grad.values()))
    return torch.func.grad(loss)({n: params[n] + radius * grad[n] / norm for n in params})


def check_peer(contender, model, x, y):
    """SAM and GNP leave their documented direction in .grad and restore the weights: checked once,
    before timing, on a float64 copy of the model and the first 8 examples against torch.func."""
    model = copy.deepcopy(model).double()
    x, y = x[:8].double(), y[:8]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    REGSTEP[contender](model)(model, x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], rtol=0, atol=1e-12, msg=f"{contender}: {n} not restored")
    plain = torch.func.grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
    if contender == "sam":
        want = _perturbed_grad(model, x, y, plain, SAM_RHO)
    else:
        shifted = _perturbed_grad(model, x, y, plain, GNP_R)
        want = {n: (1 - GNP_ALPHA) * plain[n] + GNP_ALPHA * shifted[n] for n in params}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-7, atol=1e-10, msg=f"{contender}: .grad of {n}")


REGSTEP = {
    "plain_step": lambda model: step_plain,
    "fastcurv": make_step_fastcurv,
    "sam": make_sam_step,
    "gnp": make_gnp_step,
    "torch_func": make_step_torch_func,
    "microbatch_loop": lambda model: step_microbatch,
}
MLP_ONLY = ("torch_func", "microbatch_loop")  # B sequential double-backwards: too slow for the conv nets


@pytest.mark.parametrize("contender", list(REGSTEP))
@pytest.mark.parametrize("case", ["mlp", "cnn", "resnet18"])
def test_regularized_step(benchmark, record, dev, case, contender):
    if case != "mlp" and contender in MLP_ONLY:
        pytest.skip(f"{contender} only on the MLP")
    # The micro-batch loop is B sequential double-backwards: a smaller batch keeps the run short;
    # every contender uses the same batch so the ratios are comparable.
    model, x, y = step_case(case, dev)
    record(f"regstep-{case}", contender=contender, batch=x.shape[0])
    fn = REGSTEP[contender](model)
    if contender in ("sam", "gnp"):
        check_peer(contender, model, x, y)

    def run():
        fn(model, x, y)
        sync(dev)

    benchmark.extra_info.update(memory_next_to_plain(run, lambda: step_plain(model, x, y), dev, model))
    rounds = 3 if contender == "microbatch_loop" or case == "resnet18" else 10
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


SUBBATCHES = 8  # paper 001's M


def subbatch_steps(model, x, y) -> dict:
    """``{"sgd_step", "subbatch_step"}``: a plain SGD step and the R_alpha step (M = SUBBATCHES), sharing
    one optimizer; also used by ``bench/interleaved.py``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    reg = SubBatchGradNorm(model, alpha=1e-4, beta=10.0, num_subbatches=SUBBATCHES)

    def sgd_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def subbatch_step():
        opt.zero_grad(set_to_none=True)
        reg.backward(x, y)
        opt.step()

    def subbatch_loss_term_step():  # the loss-term form: the user's own forward and backward of the data loss
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + reg(x, y)).backward()
        opt.step()

    return {"sgd_step": sgd_step, "subbatch_step": subbatch_step, "subbatch_loss_term_step": subbatch_loss_term_step}


@pytest.mark.parametrize("contender", ["sgd_step", "subbatch_step", "subbatch_loss_term_step"])
@pytest.mark.parametrize("case", ["mlp", "cnn", "resnet18"])
def test_subbatch_step(benchmark, record, dev, case, contender):
    # ResNet-18 trains with BatchNorm in train mode, as in the paper (sub-batch statistics for R_alpha)
    model, x, y = step_case(case, dev, train_batchnorm=True)
    record(f"subbatch-{case}", contender=contender, batch=x.shape[0], num_subbatches=SUBBATCHES,
           batchnorm="train" if case == "resnet18" else "none")
    steps = subbatch_steps(model, x, y)
    fn, sgd_step = steps[contender], steps["sgd_step"]

    def run():
        fn()
        sync(dev)

    benchmark.extra_info.update(memory_next_to_plain(run, sgd_step, dev, model))
    benchmark.pedantic(run, rounds=3 if case == "resnet18" else 10, warmup_rounds=1, iterations=1)


def rules_case(dev):
    big = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    B = 512 if big else 128
    x, y = torch.randn(B, 64, generator=g), torch.randint(0, 10, (B,), generator=g)
    return model.to(dev), x.to(dev), y.to(dev)


def rule_step(rule, model, x, y, **hyper):
    """One training step of ``rule`` on ``(x, y)`` (fisher trains on the hinge loss, as its paper does);
    also used by ``bench/interleaved.py``."""
    loss = "hinge" if rule == "fisher" else "cross_entropy"
    bound = make_rule(rule, **hyper).bind(model, per_example_loss(loss), epochs=10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return lambda: bound.step(x, y, opt, epoch=0)


@pytest.mark.parametrize("rule", RULES)
def test_rule_step(benchmark, record, dev, rule):
    model, x, y = rules_case(dev)
    record("rules-mlp", rule=rule, batch=x.shape[0])
    step = rule_step(rule, model, x, y)

    def run():
        step()
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
