"""Models people train, end to end: per-example squared gradient norms and the curvature-regularized
step on a nanoGPT-style GPT (T=128), ResNet-18 (32x32, B=64) and an LSTM classifier, against a plain
step, torch.func and Opacus (where it supports the model), in one run.

    python -m pytest bench/test_bench_models.py --benchmark-only --benchmark-group-by=group

``extra_info["generic"]`` lists the modules that went through fastcurv's generic (materialized) rule.
ResNet-18 uses GroupNorm for the cross-library rows (Opacus refuses BatchNorm; torch.func's per-example
gradients are undefined with batch statistics) and BatchNorm in train mode with
``batchnorm="frozen_stats"`` for fastcurv's own row.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastcurv
from fastcurv.models import LSTMClassifier, NanoGPT, resnet18
from conftest import sync
from test_bench_norms import make_opacus, make_torch_func


def make_case(name, dev):
    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        B, T, V = 8, 128, 256
        model = NanoGPT(vocab=V, block_size=T, layers=2, heads=4, d=128)
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
    elif name.startswith("resnet18"):
        B = 64
        norm = (lambda c: nn.GroupNorm(min(32, c), c)) if name == "resnet18_groupnorm" else None
        model = resnet18(norm=norm).train()
        x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
    else:
        B, T = 32, 64
        model = LSTMClassifier()
        x, y = torch.randint(0, 1000, (B, T), generator=g), torch.randint(0, 10, (B,), generator=g)
    return model.to(dev), x.to(dev), y.to(dev)


def per_example_losses(out, y):
    if out.ndim == 3:  # language model: the example's loss sums its tokens
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)
    return F.cross_entropy(out, y, reduction="none")


def capture_options(case):
    return {"batchnorm": "frozen_stats"} if case == "resnet18_bn_train" else {}


def run_plain(model, x, y, case):
    model.zero_grad(set_to_none=True)
    per_example_losses(model(x), y).sum().backward()


def run_norms(model, x, y, case):
    with fastcurv.capture(model, **capture_options(case)) as cap:
        out = model(x)
    return cap.per_example_sqnorms(per_example_losses(out, y))


def make_step(model, case):
    reg = fastcurv.regularizers.Curvature(model, alpha=1e-3, **capture_options(case))

    def run(model, x, y, case):
        model.zero_grad(set_to_none=True)
        with reg.track():
            out = model(x)
        reg.backward(per_example_losses(out, y))

    return run


CASES = ["gpt", "resnet18_groupnorm", "resnet18_bn_train", "lstm"]
CONTENDERS = ["plain_fwd_bwd", "fastcurv_norms", "fastcurv_regularized_step", "torch_func", "opacus"]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", CASES)
def test_models(benchmark, record, dev, case, contender):
    model, x, y = make_case(case, dev)
    if case == "resnet18_bn_train" and contender in ("torch_func", "opacus"):
        pytest.skip("per-example gradients with batch statistics: only fastcurv's frozen_stats/exact modes")
    generic = list(fastcurv.capture(model, **capture_options(case)).generic)
    record(f"models-{case}", contender=contender, batch=x.shape[0], generic=generic)
    if contender == "plain_fwd_bwd":
        fn = run_plain
    elif contender == "fastcurv_norms":
        fn = run_norms
    elif contender == "fastcurv_regularized_step":
        fn = make_step(model, case)
    elif contender == "torch_func":
        inner = make_torch_func(model)
        if case == "gpt":
            pytest.skip("torch.func per-example gradients of the tied GPT: the bench helper takes class targets")
        fn = lambda m, x, y, c: inner(m, x, y)  # noqa: E731
    else:
        try:
            inner = make_opacus(model)
            inner(model, x, y)
        except Exception as err:  # Opacus refuses what it does not support
            pytest.skip(f"opacus: {type(err).__name__}: {str(err)[:120]}")
        fn = lambda m, x, y, c: inner(m, x, y)  # noqa: E731

    def step():
        with sdpa_kernel(SDPBackend.MATH):  # the same attention kernel for every contender (double backward)
            fn(model, x, y, case)
        sync(dev)

    benchmark.pedantic(step, rounds=3 if dev.type == "cpu" else 20, warmup_rounds=1, iterations=1)
