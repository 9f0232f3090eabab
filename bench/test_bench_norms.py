"""Per-example squared gradient norms: fastcurv vs torch.func vmap(grad) vs BackPACK BatchL2Grad vs
Opacus ghost-clipping norms vs a plain forward+backward (the floor), in one run.

    python -m pytest bench/test_bench_norms.py --benchmark-only --benchmark-group-by=group

Every contender computes ||grad l_i||^2 for all parameters of the same model on the same batch;
BackPACK and Opacus also produce the summed gradient in the same backward (that is how they work),
fastcurv and torch.func produce only the norms. Ratios: see bench/README.md. Each benchmark also records
its peak memory next to the plain forward+backward's in extra_info (conftest.memory_next_to_plain).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastcurv
from conftest import memory_next_to_plain, sync


def mlp(big: bool):
    width = 1024
    return nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def cnn(big: bool):
    c = 64 if big else 32
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c * 8 * 8, 10),
    )


def cnn_wide(big: bool):
    """A ResNet-like channel schedule: wide channels on small maps (4x4 at the end), where the Conv
    rule's cost model takes the ghost form; the early layers take the weight-gradient kernel."""
    c = 64
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * c * 4 * 4, 10),
    )


class SequenceModel(nn.Module):
    """Embedding + two position-wise Linear layers over T tokens, mean-pooled classifier."""

    def __init__(self, vocab=1000, d=128, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        return self.head(h.mean(1))


def make_case(name, dev):
    big = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        B = 1024 if big else 256
        model, x = mlp(big), torch.randn(B, 784, generator=g)
    elif name in ("cnn", "cnn_wide"):
        B = 256 if big else 64
        model, x = (cnn if name == "cnn" else cnn_wide)(big), torch.randn(B, 3, 32, 32, generator=g)
    else:
        B, T = (256 if big else 32), 64
        model, x = SequenceModel(), torch.randint(0, 1000, (B, T), generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    return model.to(dev), x.to(dev), y.to(dev)


CASES = ["mlp", "cnn", "cnn_wide", "sequence"]


def reference_norms(model, x, y):
    """Independent oracle: per-sample gradients from torch.func, squared and summed."""
    return make_torch_func(model)(model, x, y).detach()


def run_plain(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, reduction="sum").backward()


def run_fastcurv(model, x, y):
    with fastcurv.capture(model) as cap:
        out = model(x)
    return cap.per_example_sqnorms(F.cross_entropy(out, y, reduction="none"))


def make_torch_func(model):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))

    def run(model_, x, y):
        grads = per_sample(params, x, y)
        return sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())

    return run


def make_backpack(model):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import BatchL2Grad

    model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))

    def run(_, x, y):
        model.zero_grad(set_to_none=True)
        with backpack.backpack(BatchL2Grad()):
            loss_fn(model(x), y).backward()
        return sum(p.batch_l2 for p in model.parameters())

    return run


def make_opacus(model):
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), loss_reduction="sum", use_ghost_clipping=True, max_grad_norm=1.0
    )

    def run(_, x, y):
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
        return wrapped.get_norm_sample().square()

    return run


CONTENDERS = {
    "plain_fwd_bwd": lambda model: run_plain,
    "fastcurv": lambda model: run_fastcurv,
    "torch_func": make_torch_func,
    "backpack": make_backpack,
    "opacus": make_opacus,
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("case", CASES)
def test_per_example_sqnorms(benchmark, record, dev, case, contender):
    model, x, y = make_case(case, dev)
    if contender == "backpack" and case == "sequence":
        pytest.skip("BackPACK BatchL2Grad does not support nn.Embedding")
    record(f"sqnorms-{case}", contender=contender, batch=x.shape[0])
    try:
        fn = CONTENDERS[contender](model)
    except NotImplementedError as err:
        pytest.skip(f"{contender}: {err}")
    result = fn(model, x, y)
    if result is not None:  # every contender computes the same numbers
        torch.testing.assert_close(result.float(), reference_norms(model, x, y).float(), rtol=2e-3, atol=1e-5)

    def step():
        fn(model, x, y)
        sync(dev)

    benchmark.extra_info.update(memory_next_to_plain(step, lambda: run_plain(model, x, y), dev, model))
    benchmark.pedantic(step, rounds=5 if dev.type == "cpu" else 20, warmup_rounds=1, iterations=1)
