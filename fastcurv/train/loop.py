"""The training loop: ``fit(model, train_data, test_data, rule=..., ...)`` -> :class:`History`."""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastcurv._io import exclusive
from fastcurv._validate import check_flag, check_number
from fastcurv.curvature._operator import refuse_wrappers
from fastcurv.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastcurv.train.history import History
from fastcurv.train.init import initialize
from fastcurv.train.rules import NonFiniteError, Rule, make_rule
from fastcurv.train.statistics import STATISTICS, StepStatistics
from fastcurv.train.schedules import make_schedule

LOSSES = ("auto", "cross_entropy", "mse", "hinge")
OPTIMIZERS = ("sgd", "adam")
# Everything that defines the model, the data or the training run: a checkpoint is resumed only when
# all of these match (``epochs`` may differ: a resumed run continues up to the new number). Keys an
# older checkpoint lacks are not compared.
_RESUME_KEYS = ("rule", "loss", "lr", "batch_size", "seed", "optimizer", "momentum", "schedule", "init",
                "init_scale", "task", "regularize_after_first_drop", "track_eigenvalue", "track_fisher_trace",
                "curvature_samples", "measure_loss", "model_spec", "model", "data")
_FINGERPRINT_ROWS = 1024  # examples hashed per split to recognize the data a checkpoint was trained on


class ResumeMismatchError(ValueError):
    """``fit(resume=True)`` on a checkpoint of a different run. ``differences`` lists ``(key, in the
    checkpoint, now)``; nested keys are dotted (``rule.alpha``, ``model_spec.width``)."""

    def __init__(self, checkpoint: str, differences: list[tuple[str, object, object]]):
        self.checkpoint, self.differences = checkpoint, differences
        details = "; ".join(f"{key}: checkpoint {saved!r}, now {now!r}" for key, saved, now in differences)
        super().__init__(f"fit: cannot resume from {checkpoint!r}: this run differs from the one that wrote it "
                         f"({details}). Resume with the checkpoint's settings, or start over under another "
                         "checkpoint path")


def _differences(saved: dict, now: dict, keys, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, saved, now)`` for the keys of ``keys`` present in ``saved`` that differ. Dicts are
    compared key by key so the error names the hyperparameter (``rule.alpha``), lists (fingerprints)
    by their first differing entry (``model: '2: Tanh'`` vs ``'2: ReLU'``)."""
    found = []
    for key in keys:
        if key not in saved or saved[key] == now.get(key):
            continue
        old, new = saved[key], now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, sorted(old), f"{prefix}{key}.")
            found += [(f"{prefix}{key}.{k}", None, new[k]) for k in sorted(set(new) - set(old))]
        elif isinstance(old, list) and isinstance(new, list):
            first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
            if first is None:
                found.append((f"{prefix}{key} (entries)", len(old), len(new)))
            else:
                found.append((f"{prefix}{key}", old[first], new[first]))
        else:
            found.append((f"{prefix}{key}", old, new))
    return found


def model_fingerprint(model: nn.Module) -> list[str]:
    """The architecture: every module's class and every parameter/buffer's shape and dtype. A model
    with another activation or width has another fingerprint; the weights' values do not enter."""
    return ([f"module {name or '<root>'}: {type(m).__name__}" for name, m in model.named_modules()]
            + [f"tensor {name}: {tuple(t.shape)} {t.dtype}" for name, t in model.state_dict().items()
               if isinstance(t, torch.Tensor)])


def data_fingerprint(x_train, y_train, x_test, y_test) -> list[str]:
    """Shape, dtype and a SHA-256 of up to ``_FINGERPRINT_ROWS`` evenly spaced examples of each
    split's tensors: another data set (or split, or seed of a generated one) gives another fingerprint, at the
    cost of hashing a few thousand examples."""
    import hashlib

    prints = []
    for name, t in zip(("x_train", "y_train", "x_test", "y_test"), (x_train, y_train, x_test, y_test)):
        rows = t[torch.linspace(0, t.shape[0] - 1, min(t.shape[0], _FINGERPRINT_ROWS)).long().to(t.device)]
        raw = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype, bfloat16 too
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
        prints.append(f"{name}: {tuple(t.shape)} {t.dtype} sha256 {digest}")
    return prints


def per_example_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(out, y) -> [B]`` per-example losses; their batch mean is the usual mean-reduced loss."""
    if name == "cross_entropy":
        def fn(out, y):
            return F.cross_entropy(out, y, reduction="none")
    elif name == "mse":
        def fn(out, y):
            # Mean over output dims, so that the batch mean equals F.mse_loss(out, y).
            return F.mse_loss(out, _mse_target(out, y), reduction="none").reshape(out.shape[0], -1).mean(1)
    elif name == "hinge":
        from fastcurv.losses import multiclass_hinge

        def fn(out, y):
            return multiclass_hinge(out, y, reduction="none")
    else:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    fn.loss_name = name  # lets rules refuse losses they cannot run with
    return fn


def _mse_target(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MSE target for ``out``: real targets as given; class labels ``[B]`` for logits ``[B, C]``
    become one-hot vectors (MSE on one-hot targets, a classification loss in its own right)."""
    if not y.is_floating_point() and y.dim() == 1 and out.dim() == 2 and y.shape[0] == out.shape[0]:
        return F.one_hot(y, out.shape[1]).to(out.dtype)
    if y.numel() != out.numel():
        raise ValueError(f"loss 'mse': the target of shape {tuple(y.shape)} ({y.dtype}) does not match the output "
                         f"of shape {tuple(out.shape)}; give real targets of the output's shape, or class labels "
                         "[B] for outputs [B, C] (compared with one-hot vectors)")
    return y.reshape(out.shape)


def resolve_loss(loss: str, task: str, rule_name: str) -> str:
    """``"auto"``: cross-entropy for classification (multiclass hinge for rule ``fisher``, the Fisher regularization
    deep SVM), MSE for regression."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    if loss != "auto":
        if task == "regression" and loss != "mse":
            raise ValueError(f"loss {loss!r} needs class labels; a regression task takes loss 'mse'")
        return loss
    if task == "regression":
        return "mse"
    return "hinge" if rule_name == "fisher" else "cross_entropy"


def _as_pair(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"fit: {what} x has {x.shape[0]} examples (shape {tuple(x.shape)}) but y has "
                             f"{y.shape[0]} (shape {tuple(y.shape)})")
        if x.shape[0] == 0:
            raise ValueError(f"fit: {what} is empty")
        return x, y
    raise TypeError(f"fit: {what} must be an (x, y) pair of tensors or a fastcurv.data.Dataset, got {type(data).__name__}")


def _make_optimizer(optimizer, params, lr: float, momentum: float) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if callable(optimizer):
        return optimizer(params)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}, an Optimizer, "
                     "or a callable params -> Optimizer")


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when not running data-parallel."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _GradientAveraging:
    """The optimizer the rules see in a data-parallel run: ``step()`` first averages the gradients over
    all processes (one all-reduce of the flattened gradients), then steps.

    Averaging in the optimizer rather than with a ``DistributedDataParallel`` wrapper covers every rule,
    however it produces its gradients (``backward()``, ``autograd.grad``, written by hand), and leaves
    the model unwrapped for the capture hooks and ``torch.func`` calls the rules make. A parameter
    without a gradient on every process keeps ``grad = None``; one with a gradient on some processes
    only counts zeros for the others, as DDP does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list, world: int):
        self.optimizer, self.params, self.world = optimizer, params, world

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        present = [p.grad is not None for p in self.params]
        flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self.params),
                          torch.tensor(present, dtype=self.params[0].dtype, device=self.params[0].device)])
        torch.distributed.all_reduce(flat)
        counts = flat[-len(self.params):]
        offset = 0
        for p, count in zip(self.params, counts.tolist()):
            average = flat[offset:offset + p.numel()].view_as(p) / self.world
            offset += p.numel()
            p.grad = average.to(p.dtype) if count > 0 else None
        self.optimizer.step()


def _over_budget(seconds: float, budget: float, world: int) -> bool:
    """Whether the run has used its time budget; in a data-parallel run rank 0's clock decides for every
    process (one broadcast), so that all stop after the same step."""
    over = seconds >= budget
    if world > 1:
        flag = torch.tensor([float(over)])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.broadcast(flag, 0)
        over = bool(flag.item())
    return over


def parameter_norm(model: nn.Module) -> float:
    """L2 norm of all parameters (in float64)."""
    with torch.no_grad():
        return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))


class DivergenceError(NonFiniteError):
    """The training loss grew by orders of magnitude (see ``fit(divergence_factor=...)``): the run diverged
    although every number is still finite."""


_STOP_ADVICE = "stopping instead of training on garbage (lower the learning rate or the regularization strength)"


def _check_finite_parameters(model: nn.Module, rule: str, epoch: int, step: int) -> None:
    params = [p for p in model.parameters() if p.numel()]
    if not params:
        return
    with torch.no_grad():
        # One reduction and one sync for all tensors. max |p| propagates nan/inf and, unlike a sum, cannot
        # overflow on finite values, so "non-finite" here always means a nan/inf parameter.
        if torch.isfinite(torch.stack([p.detach().abs().amax().double() for p in params])).all():
            return
        bad = next(n for n, p in model.named_parameters() if not torch.isfinite(p).all())
    raise NonFiniteError(f"rule {rule!r}: parameters became nan/inf at epoch {epoch}, step {step} "
                         f"(first bad: {bad}); {_STOP_ADVICE}")


def _check_divergence(train_loss: float, best: float, untrained: float, factor: float | None, rule: str,
                      epoch: int) -> None:
    """Finite garbage: the epoch's training loss is ``factor`` times its best so far and above the untrained
    model's loss. The second condition keeps a run that fitted to ~0 loss (hinge loss reaches exactly 0)
    from tripping on a small rise."""
    if factor is not None and train_loss > factor * best and train_loss > untrained:
        raise DivergenceError(
            f"rule {rule!r}: the training loss {train_loss:.4g} after epoch {epoch} is more than {factor:g}x its "
            f"best so far ({best:.4g}) and above the untrained model's ({untrained:.4g}): the run diverged; "
            f"{_STOP_ADVICE}. fit(divergence_factor=None) turns this check off"
        )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, task: str,
             chunk: int = 2048) -> tuple[float, float]:
    """(mean loss, accuracy) for classification or (mean loss, MSE) for regression, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, total_metric = 0.0, 0.0
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        out = model(xb)
        total_loss += float(loss_fn(out, yb).double().sum())
        if task == "classification":
            total_metric += float((out.argmax(1) == yb).double().sum())
        else:
            total_metric += float((out - yb.reshape(out.shape)).double().pow(2).reshape(out.shape[0], -1).mean(1).sum())
    model.train(was_training)
    n = x.shape[0]
    return total_loss / n, total_metric / n


def top_hessian_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, seed: int = 0,
                           tol: float = 1e-3) -> float:
    """Largest (algebraic) eigenvalue of the Hessian of the mean of ``loss_fn(model(x), y)`` (Lanczos)."""
    from fastcurv.curvature import Hessian, top_eigenvalues

    mean_loss = lambda out, target: loss_fn(out, target).mean()  # noqa: E731
    values, _ = top_eigenvalues(Hessian(model, mean_loss, (x, y)), k=1, which="LA", tol=tol, seed=seed,
                                progress=False)
    return float(values[0])


def _curvature_record(model, x, y, loss_fn, want_eigen: bool, want_fisher: bool, seed: int, epoch: int) -> dict:
    """Top Hessian eigenvalue of the mean data loss and Fisher trace on a fixed training subset."""
    record = {}
    was_training = model.training
    model.eval()
    # The iterative solvers draw random start vectors: fork the RNG so that measuring does not change
    # the training run, and seed it so that a resumed run measures the same numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + epoch + 7)
        if want_eigen:
            record["top_eigenvalue"] = top_hessian_eigenvalue(model, x, y, loss_fn, seed=seed * 1_000_003 + epoch)
        if want_fisher:
            from fastcurv.metrics import fisher_trace

            record["fisher_trace"] = float(fisher_trace(model, x, y))
    model.train(was_training)
    return record


def _one_writer(fit_function):
    """``fit`` holds its checkpoint's lock (:func:`fastcurv._io.exclusive`) for the whole run, on the
    process that writes it (rank 0): a second run on the same checkpoint is refused at once, not after
    it has overwritten (or deleted the temp file of) the first run's epochs."""
    @functools.wraps(fit_function)
    def locked(*args, **kwargs):
        checkpoint = kwargs.get("checkpoint")  # keyword-only
        if checkpoint is None or distributed_rank_world()[0] != 0 or os.path.isdir(checkpoint):
            return fit_function(*args, **kwargs)
        with exclusive(checkpoint, "checkpoint"):
            return fit_function(*args, **kwargs)
    return locked


@_one_writer
def fit(
    model: nn.Module,
    train_data,
    test_data=None,
    *,
    rule: str | Rule = "sgd",
    rule_options: dict | None = None,
    optimizer="sgd",
    lr: float = 0.1,
    momentum: float = 0.0,
    epochs: int = 10,
    batch_size: int = 64,
    schedule=None,
    loss: str = "auto",
    task: str | None = None,
    seed: int = 0,
    init: str = "default",
    init_scale: float = 1.0,
    regularize_after_first_drop: bool = False,
    track_eigenvalue: bool = False,
    track_fisher_trace: bool = False,
    curvature_samples: int = 256,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    model_spec: dict | None = None,
    stop_after: int | None = None,
    divergence_factor: float | None = 100.0,
    measure_loss: str | None = None,
    time_budget: float | None = None,
    statistics=(),
) -> History:
    """Train ``model`` in place with learning rule ``rule``; return the per-epoch :class:`History`.

    Args:
        model: the network.
        train_data: an ``(x, y)`` pair of tensors, or a :class:`fastcurv.data.Dataset` (then its train
            and test splits and its task are used and ``test_data`` must be ``None``).
        test_data: an ``(x, y)`` pair (required unless ``train_data`` is a Dataset).
        rule: a name from :data:`fastcurv.train.RULES` or a :class:`Rule`; ``rule_options`` override
            its hyperparameters (``{"lam": 1e-3}``).
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"``, an Optimizer over ``model``'s
            parameters, or a callable ``params -> Optimizer``. ``lr`` is the initial learning rate.
        epochs: total epochs (a resumed run continues up to this number).
        batch_size: examples per step; the training set is reshuffled each epoch from ``seed`` and the
            last incomplete batch is dropped (rule ``subbatch`` needs equal sub-batches), unless the
            whole set is smaller than ``batch_size`` (then one full batch per epoch).
        schedule: ``None`` (constant lr), an int ``lr_drop`` for the Fisher regularization paper's step halving
            ``lr0 * 0.5 ** ceil(t / lr_drop)``, or a callable ``t -> lr`` (see :mod:`.schedules`).
        loss: ``"auto"`` (cross-entropy for classification, multiclass hinge for rule ``fisher``,
            MSE for regression), ``"cross_entropy"``, ``"hinge"`` or ``"mse"``. History losses (and
            the generalization gap) are of this loss, without the penalty.
        task: ``"classification"`` or ``"regression"``; inferred from a Dataset or from ``y``'s dtype.
        seed: seeds the initialization (when ``init`` is not ``"default"``), the batch order and the
            curvature measurements. Seed the model's construction yourself (``torch.manual_seed``).
        init, init_scale: Jarvis (2021)'s regimes, see :func:`fastcurv.train.initialize` (applied only
            when starting fresh, not on resume).
        regularize_after_first_drop: run plain SGD steps until the schedule's first LR drop, then the
            rule (Jia & Su 2020 enable their regularizer only after the first drop).
        track_eigenvalue, track_fisher_trace: per epoch, measure the top Hessian eigenvalue of the data
            loss and the Fisher trace on the first ``curvature_samples`` training examples.
        measure_loss: ``None`` (the training loss) or a loss name (``"cross_entropy"``, ``"mse"``...):
            the loss whose Hessian ``top_eigenvalue`` measures, and, in records ``measure_train_loss``,
            ``measure_test_loss`` and ``measure_gap``, the loss evaluated besides the training loss.
            Runs trained on different losses (rule ``fisher`` on the hinge loss) are only comparable
            on one common loss; ``fastcurv compare`` passes cross-entropy (MSE for regression).
        checkpoint: path written (atomically) at the end of every epoch.
        resume: continue from ``checkpoint`` when that file exists (fresh start otherwise); the run's
            configuration must match the checkpoint's. The resumed history equals an uninterrupted one
            (apart from timings).
        progress: show a tqdm bar; default: only when stderr is a terminal.
        device: where to train (default: where ``model``'s parameters are).

        statistics: per-epoch training statistics from every step's batch, any of ``"noise_scale"``
            (records ``noise_scale``, the gradient noise scale ``B_simple`` of McCandlish et al. 2018, with
            ``trace_covariance`` and ``grad_sq_norm``, averaged over the epoch's steps before the ratio, and
            ``noise_scale.<layer>`` per layer; see :func:`fastcurv.metrics.gradient_noise_scale`) and ``"grand"``
            (``grand_mean``, ``grand_std``, ``grand_max`` of the GraNd scores ``||grad l_i||`` of the epoch's
            examples, each at the weights of its step). Measured on the training loss without the penalty,
            in train mode. Rules ``sgd``, ``l2`` and ``l2_stopped`` take them from the step's own forward and
            backward (near-zero extra cost); other rules pay one captured forward and backward per step. In a
            data-parallel run they are those of the whole batch, not of one process's share.

    Data-parallel training: when a ``torch.distributed`` process group is initialized (e.g. under
    ``torchrun``), every process draws the same batches, trains on its equal share of each (the batch
    size must be divisible by the number of processes), and gradients are averaged before each step;
    rank 0's parameters are broadcast first and only rank 0 writes the checkpoint. For rules whose
    penalty is a mean over examples (sgd, l2, curvature, metric, l2_stopped, fisher with
    ``mode="per_example"``) this is the one-process run on the whole batch; for rules with a penalty
    that is nonlinear in the batch (fisher ``mode="batch"``, subbatch, the selective-L2 masks) each
    process computes its shard's penalty and the gradients are averaged, a different estimator (as
    BatchNorm's per-GPU statistics are).
        model_spec: JSON-friendly description stored in the checkpoint so ``fastcurv sharpness`` can
            rebuild the model (the CLI passes ``{"dataset": ..., "activation": ..., "width": ...}``).
        stop_after: stop (after checkpointing) once this many epochs have finished, as if interrupted.
        time_budget: seconds of training steps (evaluation, checkpoints and curvature tracking excluded)
            after which the run stops: the step that crosses the budget is the last, and the epoch in
            progress is evaluated and recorded (a partial last epoch). ``epochs`` stays an upper bound
            (``fastcurv compare --time-budget`` passes a large one). Records carry ``wall_time`` (training
            seconds so far) and ``steps`` (steps so far) with or without a budget; a resumed run counts
            the checkpoint's training time against the budget.
        divergence_factor: stop with :class:`DivergenceError` when an epoch's training loss exceeds
            ``divergence_factor`` times the best training loss so far (the untrained model's included)
            *and* the untrained model's loss: a run whose numbers stay finite but whose loss grew by
            orders of magnitude (e.g. a tanh model at lr 1e12). ``None`` turns the check off. Default
            100: a run that trains normally never loses to its own untrained model.

    Raises:
        NonFiniteError: the loss or a parameter became nan/inf (the last checkpoint is kept).
        DivergenceError: (a NonFiniteError) the run diverged with finite numbers, as above (the last
            checkpoint is kept).
    """
    from fastcurv.data import Dataset

    if isinstance(train_data, Dataset):
        if test_data is not None:
            raise ValueError("fit: test_data must be None when train_data is a fastcurv.data.Dataset")
        task = task or train_data.task
        train_data, test_data = train_data.train, train_data.test
    if test_data is None:
        raise ValueError("fit: test_data is required (an (x, y) pair) unless train_data is a Dataset")
    x_train, y_train = _as_pair(train_data, "train_data")
    x_test, y_test = _as_pair(test_data, "test_data")
    if task is None:
        task = "regression" if y_train.is_floating_point() else "classification"
    if task not in ("classification", "regression"):
        raise ValueError(f"fit: task must be 'classification' or 'regression', got {task!r}")
    epochs = check_number("fit", "epochs", epochs, integer=True, low=0)
    batch_size = check_number("fit", "batch_size", batch_size, integer=True, low=1)
    lr = check_number("fit", "lr", lr, low=0, low_open=True)
    momentum = check_number("fit", "momentum", momentum, low=0)
    seed = check_number("fit", "seed", seed, integer=True)
    init_scale = check_number("fit", "init_scale", init_scale, low=0, low_open=True)
    curvature_samples = check_number("fit", "curvature_samples", curvature_samples, integer=True, low=1)
    stop_after = check_number("fit", "stop_after", stop_after, integer=True, low=0, allow_none=True)
    divergence_factor = check_number("fit", "divergence_factor", divergence_factor, low=1, low_open=True,
                                     allow_none=True, why="None turns the check off")
    for flag, value in (("regularize_after_first_drop", regularize_after_first_drop), ("resume", resume),
                        ("track_eigenvalue", track_eigenvalue), ("track_fisher_trace", track_fisher_trace)):
        check_flag("fit", flag, value)
    if isinstance(statistics, str):
        statistics = (statistics,)
    statistics = tuple(statistics)
    unknown = [name for name in statistics if name not in STATISTICS]
    if unknown:
        raise ValueError(f"fit: unknown statistics {unknown}; valid: {', '.join(STATISTICS)}")
    time_budget = check_number("fit", "time_budget", time_budget, low=0, low_open=True, allow_none=True,
                               why="seconds")
    if checkpoint is not None and os.path.isdir(checkpoint):  # found now, not after the first epoch
        raise CheckpointError(f"fit: checkpoint path {os.fspath(checkpoint)!r} is a directory; give a file name")

    refuse_wrappers(model, "fit")
    rule_obj = make_rule(rule, **(rule_options or {}))
    loss_name = resolve_loss(loss, task, rule_obj.name)
    if task == "regression" and loss_name != "mse":
        raise ValueError(f"fit: rule {rule_obj.name!r} with a regression task needs loss 'mse'")
    loss_fn = per_example_loss(loss_name)
    if measure_loss is not None and task == "regression" and measure_loss != "mse":
        raise ValueError(f"fit: measure_loss {measure_loss!r} needs class labels; a regression task takes 'mse'")
    measure_fn = loss_fn if measure_loss is None else per_example_loss(measure_loss)
    sched = make_schedule(lr, schedule)
    first_drop = sched.first_drop_epoch() if hasattr(sched, "first_drop_epoch") else None
    if regularize_after_first_drop and first_drop is None:
        raise ValueError(f"fit: regularize_after_first_drop needs a schedule that drops the learning rate; got {sched!r}")

    if track_fisher_trace:  # fail now, not after the first epoch's training
        try:
            from fastcurv.metrics import fisher_trace  # noqa: F401
        except ImportError as err:
            raise ImportError(f"fit(track_fisher_trace=True) needs fastcurv.metrics.fisher_trace: {err}") from err

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, momentum)
    rule_obj.bind(model, loss_fn, int(epochs))
    step_statistics = StepStatistics(model, loss_fn, statistics) if statistics else None
    # a rule that keeps the plain step records the statistics in it; the others are measured before each step
    measure_apart = step_statistics is not None and type(rule_obj).step is not Rule.step
    rule_obj.statistics = None if measure_apart else step_statistics

    run_config = {
        "rule": rule_obj.config(), "loss": loss_name, "lr": float(lr), "batch_size": int(batch_size),
        "seed": int(seed), "optimizer": optimizer if isinstance(optimizer, str) else type(opt).__name__,
        "momentum": float(momentum), "schedule": repr(sched), "init": init, "init_scale": float(init_scale),
        "regularize_after_first_drop": bool(regularize_after_first_drop), "task": task,
        "track_eigenvalue": bool(track_eigenvalue), "track_fisher_trace": bool(track_fisher_trace),
        "curvature_samples": int(curvature_samples), "measure_loss": measure_loss,
        "model_spec": model_spec, "model": model_fingerprint(model),
        "data": data_fingerprint(x_train, y_train, x_test, y_test),
    }

    history = History()
    start_epoch = 0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint)
        differences = _differences(state.get("config", {}), run_config, _RESUME_KEYS)
        if differences:
            raise ResumeMismatchError(os.fspath(checkpoint), differences)
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        rule_obj.load_state_dict(state.get("rule_state", {}))
        torch.set_rng_state(state["torch_rng_state"])
        history = History.from_list(state["history"])
        start_epoch = int(state["epoch"])
        untrained_loss = float(state.get("untrained_train_loss", history[0]["train_loss"] if len(history) else math.inf))
    else:
        torch.manual_seed(seed)
        if init != "default":
            initialize(model, init, init_scale, generator=torch.Generator().manual_seed(seed))
        untrained_loss = None

    n_train = x_train.shape[0]
    effective_batch = min(batch_size, n_train)
    steps_per_epoch = n_train // effective_batch
    # Data-parallel (e.g. under torchrun): every process draws the same batches and trains on its equal
    # share of each, and gradients are averaged before each step, so the run is the one-process run.
    rank, world = distributed_rank_world()
    step_optimizer = opt
    if world > 1:
        if effective_batch % world:
            raise ValueError(f"fit: a data-parallel run over {world} processes needs a batch size divisible by "
                             f"{world}, got {effective_batch}")
        step_optimizer = _GradientAveraging(opt, params, world)
        with torch.no_grad():  # start from rank 0's model, whatever each process built
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor, 0)
    local_batch = effective_batch // world
    if untrained_loss is None:  # after the broadcast: every process must take the same divergence decisions
        untrained_loss = evaluate(model, x_train, y_train, loss_fn, task)[0]
    best_loss = min([untrained_loss, *(r["train_loss"] for r in history)])
    curv_x, curv_y = x_train[:curvature_samples], y_train[:curvature_samples]
    if progress is None:
        progress = sys.stderr.isatty() and rank == 0

    from tqdm.auto import tqdm

    bar = tqdm(total=None if time_budget is not None else int(epochs), initial=start_epoch, disable=not progress,
               desc=rule_obj.name, unit="epoch", leave=False)
    trained_time = float(history[-1].get("wall_time", 0.0)) if len(history) else 0.0
    trained_steps = int(history[-1].get("steps", 0)) if len(history) else 0
    try:
        for epoch in range(start_epoch, int(epochs)):
            if stop_after is not None and epoch >= stop_after:
                break
            if time_budget is not None and trained_time >= time_budget:
                break
            epoch_lr = float(sched(epoch))
            for group in opt.param_groups:
                group["lr"] = epoch_lr
            active = not regularize_after_first_drop or epoch >= first_drop
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            order = order.to(device)
            model.train()
            start = time.perf_counter()
            steps_done = 0
            for step in range(steps_per_epoch):
                start_of_share = step * effective_batch + rank * local_batch
                idx = order[start_of_share:start_of_share + local_batch]
                if measure_apart:
                    step_statistics.measure(x_train[idx], y_train[idx])
                try:
                    rule_obj.step(x_train[idx], y_train[idx], step_optimizer, epoch, active=active)
                except NonFiniteError as err:
                    raise NonFiniteError(f"{err} [epoch {epoch}, step {step}, lr {epoch_lr:g}]") from None
                _check_finite_parameters(model, rule_obj.name, epoch, step)
                steps_done += 1
                if time_budget is not None:
                    if device.type == "cuda":  # the budget is of finished work, not of queued kernels
                        torch.cuda.synchronize(device)
                    if _over_budget(trained_time + time.perf_counter() - start, time_budget, world):
                        break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            trained_time += elapsed
            trained_steps += steps_done

            train_loss, train_metric = evaluate(model, x_train, y_train, loss_fn, task)
            _check_divergence(train_loss, best_loss, untrained_loss, divergence_factor, rule_obj.name, epoch)
            best_loss = min(best_loss, train_loss)
            test_loss, test_metric = evaluate(model, x_test, y_test, loss_fn, task)
            metric = "accuracy" if task == "classification" else "error"
            record = {
                "epoch": epoch, "lr": epoch_lr, "regularizing": bool(active),
                "train_loss": train_loss, "test_loss": test_loss, "gap": test_loss - train_loss,
                f"train_{metric}": train_metric, f"test_{metric}": test_metric,
                "param_norm": parameter_norm(model),
                "time_per_step": elapsed / max(steps_done, 1), "epoch_time": elapsed,
                "wall_time": trained_time, "steps": trained_steps,
            }
            if step_statistics is not None:
                record.update(step_statistics.epoch_record())
            if measure_loss is not None:
                measured_train = evaluate(model, x_train, y_train, measure_fn, task)[0]
                measured_test = evaluate(model, x_test, y_test, measure_fn, task)[0]
                record.update(measure_train_loss=measured_train, measure_test_loss=measured_test,
                              measure_gap=measured_test - measured_train)
            if track_eigenvalue or track_fisher_trace:
                record.update(_curvature_record(model, curv_x, curv_y, measure_fn, track_eigenvalue,
                                                track_fisher_trace, seed, epoch))
            history.append(record)
            if checkpoint is not None and rank == 0:
                save_checkpoint(checkpoint, {
                    "model_state": model.state_dict(), "optimizer_state": opt.state_dict(),
                    "rule_state": rule_obj.state_dict(), "torch_rng_state": torch.get_rng_state(),
                    "history": history.to_list(), "epoch": epoch + 1, "epochs": int(epochs),
                    "config": run_config, "model_spec": model_spec, "untrained_train_loss": untrained_loss,
                })
            bar.update(1)
            bar.set_postfix(train_loss=f"{train_loss:.3g}", test=f"{test_metric:.3g}")
    finally:
        bar.close()
    return history
