"""Issue 16's benchmark: the models users load, as built, against the peers that can run them.

* ``zoo-resnet18``: torchvision ``resnet18(num_classes=10)`` as built (in-place ReLU, ``out += identity``),
  B=64, 32x32. BatchNorm in eval mode (running statistics) for the rows compared across libraries, so every
  contender computes the same per-example gradients; one more fastcurv row in train mode with
  ``batchnorm="frozen_stats"`` (what a training run uses; a different quantity, not compared).
* ``zoo-gpt2``: Hugging Face ``GPT2LMHeadModel`` as built (tied ``wte``/``lm_head``, ``Conv1D``, position ids
  ``[1, T]``), 2 layers, d=256, 4 heads, T=128, vocabulary 1024, B=8, eager attention, dropout 0; an
  example's loss sums its tokens' cross-entropy.

Each model has two tables: per-example squared gradient norms (vs a plain forward+backward) and the
curvature-regularized step ``mean l + alpha mean_i ||grad l_i||^2`` (vs a plain step). Peers: Opacus
(``GradSampleModule`` per-sample gradients, then their norms) and torch.func (``vmap(grad)``; for the step with
the penalty differentiated through it). A peer that cannot run a model is not timed: the table says why,
with the error it raised. Before timing, every contender's result is compared with fastcurv's (norms, or the
``.grad`` the step leaves): ``check`` is the max relative difference.

Run through ``bench/interleaved.py`` (contenders alternate within each round; medians; ratios):

    python bench/interleaved.py zoo-resnet18 zoo-gpt2 [--rounds 20] [--device cuda]
    python bench/interleaved.py zoo-resnet18 zoo-gpt2 --quick     # tiny sizes: a check that it runs
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# appended, not prepended: bench/conftest.py must stay the `conftest` the other bench modules import
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from thirdparty import _load_torchvision  # noqa: E402  (torchvision wheels built for another torch)

import fastcurv  # noqa: E402
from fastcurv.regularizers import Curvature  # noqa: E402

ALPHA = 1e-3
ZOO_GROUPS = ["zoo-resnet18", "zoo-gpt2"]


@dataclass
class Table:
    """One interleaved table: ``steps`` (name -> zero-argument callable, the baseline first), ``notes``
    (name -> the check against fastcurv, measured before timing, and remarks), ``unavailable`` (name -> why)."""

    title: str
    steps: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    unavailable: dict = field(default_factory=dict)

    def add(self, name, step, check=None, remark=""):
        self.steps[name] = step
        note = "; ".join(p for p in (f"check {check:.1e}" if check is not None else "", remark) if p)
        if note:
            self.notes[name] = note


# ---------------------------------------------------------------------------- the models
@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    losses: Callable  # (output, y) -> [B] per-example losses
    train_model: nn.Module = None  # the same model in train mode (frozen_stats row), or None


def image_losses(out, y):
    return F.cross_entropy(out, y, reduction="none")


def token_losses(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)


def resnet18_case(dev, quick=False) -> Case:
    tv = _load_torchvision()
    if tv is None:
        raise RuntimeError("torchvision is not installed")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B = 4 if quick else 64
    model = tv.models.resnet18(weights=None, num_classes=10).to(dev)
    x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
    return Case("resnet18", model.eval(), x.to(dev), y.to(dev), image_losses, copy.deepcopy(model).train())


class CausalLM(nn.Module):
    """``model(ids) -> logits``: the HF model called as a user calls it, without labels or a cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def gpt2_case(dev, quick=False) -> Case:
    _load_torchvision()
    import transformers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B, T, d, V = (2, 16, 32, 64) if quick else (8, 128, 256, 1024)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=d, n_layer=2, n_head=4, n_positions=T, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    model = CausalLM(transformers.GPT2LMHeadModel(cfg)).to(dev).eval()
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    return Case("gpt2", model, x.to(dev), y.to(dev), token_losses)


CASES = {"zoo-resnet18": resnet18_case, "zoo-gpt2": gpt2_case}


# ---------------------------------------------------------------------------- per-example norms
def plain(case):
    """The floor of both tables: one forward and backward of the mean loss."""
    def run():
        case.model.zero_grad(set_to_none=True)
        case.losses(case.model(case.x), case.y).mean().backward()
    return run


def norms_fastcurv(case, model=None, **options):
    model = model or case.model

    def run():
        with fastcurv.capture(model, **options) as cap:
            out = model(case.x)
        return cap.per_example_sqnorms(case.losses(out, case.y))
    return run


def vmapped_grad(case):
    """torch.func: ``(params, x, y) -> {name: [B, *shape]}``, each example run as a batch of one."""
    def one(p, xi, yi):
        return case.losses(torch.func.functional_call(case.model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))


def norms_torch_func(case):
    params = {k: v.detach() for k, v in case.model.named_parameters()}
    per_example = vmapped_grad(case)

    def run():
        grads = per_example(params, case.x, case.y)
        return sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())
    return run


def norms_opacus(case):
    from opacus import GradSampleModule

    # Opacus records activations only in train mode; dropout is 0 in these models, and its BatchNorm refusal
    # does not depend on the mode
    wrapped = GradSampleModule(copy.deepcopy(case.model).train(), loss_reduction="sum")

    B = case.x.shape[0]

    def run():
        wrapped.zero_grad(set_to_none=True)
        case.losses(wrapped(case.x), case.y).sum().backward()
        named = [(n.removeprefix("_module."), p.grad_sample) for n, p in wrapped.named_parameters() if p.requires_grad]
        # a grad_sample without B rows is no per-example gradient (HF GPT-2's wpe, called on position ids [1, T],
        # gets [1, T, d]): left out of the norms and named
        run.not_per_example = [f"{n} {tuple(g.shape)}" for n, g in named if g.shape[0] != B]
        return sum(g.reshape(B, -1).square().sum(1) for _, g in named if g.shape[0] == B)
    return run


# ---------------------------------------------------------------------------- the regularized step
def step_fastcurv(case, model=None, **options):
    model = model or case.model
    reg = Curvature(model, alpha=ALPHA, **options)

    def run():
        model.zero_grad(set_to_none=True)
        with reg.track():
            out = model(case.x)
        reg.backward(case.losses(out, case.y))
    return run


def step_torch_func(case):
    model = case.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    per_example = vmapped_grad(case)

    def run():
        model.zero_grad(set_to_none=True)
        grads = per_example(dict(model.named_parameters()), case.x, case.y)
        penalty = sum(grads[n].reshape(case.x.shape[0], -1).square().sum(1) for n in names).mean()
        (case.losses(model(case.x), case.y).mean() + ALPHA * penalty).backward()
    return run


OPACUS_STEP = ("Opacus' per-sample gradients are written by backward hooks outside autograd (no create_graph), "
               "so the penalty's gradient cannot be taken through them")


# ---------------------------------------------------------------------------- the tables
def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:220]}{'...' if len(text) > 220 else ''}"


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def tables(group: str, dev, quick=False) -> list[Table]:
    case = CASES[group](dev, quick)
    where = f"{case.name}, B={case.x.shape[0]}, input {tuple(case.x.shape[1:])}"
    other = "train-mode BatchNorm: another quantity, not compared"
    norms = Table(f"{group} per-example norms ({where})")
    norms.add("plain fwd+bwd", plain(case))
    reference = norms_fastcurv(case)()
    norms.add("fastcurv", norms_fastcurv(case), check=0.0)
    if case.train_model is not None:
        norms.add("fastcurv (frozen_stats)", norms_fastcurv(case, case.train_model, batchnorm="frozen_stats"), remark=other)
    for name, make in (("torch.func vmap(grad)", norms_torch_func), ("opacus GradSampleModule", norms_opacus)):
        try:
            run = make(case)
            check = _rel(run(), reference)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this model is reported, not timed
            norms.unavailable[name] = _why(exc)
            continue
        remark = ""
        if getattr(run, "not_per_example", None):
            remark = ("WRONG: its grad_sample has no per-example rows for " + ", ".join(run.not_per_example)
                      + " (left out of its norms)")
        norms.add(name, run, check=check, remark=remark)

    step = Table(f"{group} regularized step, alpha={ALPHA:g} ({where})")
    step.add("plain step", plain(case))
    run = step_fastcurv(case)
    run()
    reference = _grads(case.model)
    step.add("fastcurv Curvature", run, check=0.0)
    if case.train_model is not None:
        step.add("fastcurv (frozen_stats)", step_fastcurv(case, case.train_model, batchnorm="frozen_stats"), remark=other)
    try:
        run = step_torch_func(case)
        run()
        step.add("torch.func vmap(grad)", run, check=_rel(_grads(case.model), reference))
    except Exception as exc:  # noqa: BLE001
        step.unavailable["torch.func vmap(grad)"] = _why(exc)
    failed = norms.unavailable.get("opacus GradSampleModule")
    step.unavailable["opacus"] = OPACUS_STEP + (f"; its per-sample gradients fail here too ({failed})" if failed else "")
    return [norms, step]
