"""Data-parallel training (DDP, gloo, 2 CPU processes): a fastcurv-regularized step on two shards gives the
gradients of one process on the concatenated batch, and `fastcurv train` under torchrun trains like one
process on the whole data. FSDP is refused with a clear error."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastcurv.regularizers import Curvature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
ALPHA = 0.3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()


MODELS = {"mlp": (mlp, (5,)), "cnn": (cnn, (2, 4, 4))}


def batch(model_name, n=12):
    gen = torch.Generator().manual_seed(1)
    shape = MODELS[model_name][1]
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def regularized_gradients(model, x, y):
    """``grad [mean_i l_i + alpha mean_i ||grad l_i||^2]`` on (x, y), through fastcurv's Curvature."""
    reg = Curvature(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model, ALPHA)
    with reg.track():
        out = model(x)
    per_example = F.cross_entropy(out, y, reduction="none")
    (per_example.mean() + reg(per_example)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _fit_metric_rule(model_seed):
    """fastcurv.train.fit with rule metric (an HVP per step) on a small problem; the final parameters."""
    from fastcurv.train import fit

    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = batch("mlp", n=24)
    fit(model, (x, y), (x, y), rule="metric", epochs=2, batch_size=8, lr=0.1, seed=3, progress=False)
    return [p.detach().clone() for p in model.parameters()]


def _noise_scale_batches():
    x, y = batch("mlp", n=24)
    return [(x[:12], y[:12]), (x[12:], y[12:])]


def _fit_with_statistics(rule, model_seed):
    """fit with statistics=("noise_scale", "grand"): the per-epoch records (timings dropped)."""
    from fastcurv.train import fit

    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = batch("mlp", n=24)
    history = fit(model, (x, y), (x, y), rule=rule, epochs=2, batch_size=8, lr=0.1, seed=3, progress=False,
                  statistics=("noise_scale", "grand"))
    return history.without_timing()


def _ddp_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for model_name, (make, _) in MODELS.items():  # one spawn for all models: starting processes is slow
            model = nn.parallel.DistributedDataParallel(make())
            x, y = batch(model_name)
            shard = slice(rank * x.shape[0] // WORLD, (rank + 1) * x.shape[0] // WORLD)
            results[model_name] = regularized_gradients(model, x[shard], y[shard])  # DDP averages over ranks
        results["fit"] = _fit_metric_rule(rank)  # each rank builds a different model: rank 0's is broadcast
        from fastcurv.metrics import gradient_noise_scale

        half = lambda t: t[rank * t.shape[0] // WORLD:(rank + 1) * t.shape[0] // WORLD]  # noqa: E731
        results["noise_scale"] = gradient_noise_scale(mlp(), [(half(x), half(y)) for x, y in _noise_scale_batches()])
        # sgd records in its own step, curvature is measured before its step: both paths, whole-batch numbers
        results["fit_statistics"] = {rule: _fit_with_statistics(rule, rank) for rule in ("sgd", "curvature")}
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_regularized_step_equals_one_process_on_the_whole_batch(tmp_path):
    """Mean over 2 equal shards of (mean loss + mean penalty) = the full batch's: DDP's averaged gradient
    must equal one process's on the concatenated batch (MLP and CNN)."""
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    distributed = torch.load(out_file)
    for model_name, (make, _) in MODELS.items():
        single = regularized_gradients(make(), *batch(model_name))
        assert len(distributed[model_name]) == len(single)
        for got, want in zip(distributed[model_name], single):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        # The penalty matters here: without it the gradients differ.
        plain_model = make()
        x, y = batch(model_name)
        F.cross_entropy(plain_model(x), y).backward()
        assert not torch.allclose(plain_model[0].weight.grad, single[0])
    # fit under a process group: rank 0's model broadcast, half of every batch per rank, gradients averaged
    # before each step = one process training rank 0's model on the whole batches.
    for got, want in zip(distributed["fit"], _fit_metric_rule(0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # per-example statistics over the whole batch, not one shard: 2 ranks = 1 process on the full batches
    from fastcurv.metrics import gradient_noise_scale

    single = gradient_noise_scale(mlp(), _noise_scale_batches())
    got = distributed["noise_scale"]
    one_shard = gradient_noise_scale(mlp(), [(x[:6], y[:6]) for x, y in _noise_scale_batches()])
    assert one_shard["noise_scale"] != pytest.approx(single["noise_scale"], rel=1e-3)  # a shard's own numbers differ
    for key in ("noise_scale", "trace_covariance", "grad_sq_norm"):
        assert got[key] == pytest.approx(single[key], rel=1e-10)
        for layer in ("0", "2"):
            assert got["by_layer"][layer][key] == pytest.approx(single["by_layer"][layer][key], rel=1e-10)
    for rule, records in distributed["fit_statistics"].items():
        for got, want in zip(records, _fit_with_statistics(rule, 0)):
            for key in ("noise_scale", "noise_scale.0", "noise_scale.2", "trace_covariance", "grand_mean", "grand_std",
                        "grand_max"):
                assert got[key] == pytest.approx(want[key], rel=1e-9), (rule, key)


def _fsdp_worker(rank, init_file, out_file):
    from torch.distributed.fsdp import fully_shard

    from fastcurv.train import fit

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = mlp().float()
        fully_shard(model)
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        try:
            fit(model, (x, y), (x, y), epochs=1, progress=False)
            message = "no error"
        except Exception as err:  # noqa: BLE001 - the test inspects it
            message = f"{type(err).__name__}: {err}"
        if rank == 0:
            with open(out_file, "w") as handle:
                handle.write(message)
    finally:
        dist.destroy_process_group()


def test_fsdp_is_refused_clearly(tmp_path):
    out_file = tmp_path / "message.txt"
    try:
        mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    except Exception as err:  # fully_shard itself may not run on CPU/gloo in this torch build
        pytest.skip(f"FSDP2 does not run on CPU here: {err}")
    message = out_file.read_text()
    assert "ValueError" in message and "FSDP" in message and "not supported" in message, message


def test_fastcurv_train_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 fastcurv train`: each rank trains on its half of every batch, DDP
    averages, so the run equals one process (same seed, same batches) up to rounding; only rank 0 writes."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    common = ["train", "--dataset", "xord", "--rule", "curvature", "--epochs", "2", "--batch-size", "8", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "fastcurv.cli"]
    parallel = subprocess.run([*torchrun, *common, "--checkpoint", str(tmp_path / "ddp.pt")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "fastcurv.cli", *common, "--checkpoint", str(tmp_path / "one.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_records = [json.loads(line) for line in parallel.stdout.strip().splitlines()]
    one_records = [json.loads(line) for line in single.stdout.strip().splitlines()]
    assert len(ddp_records) == len(one_records) == 2  # rank 0 alone printed its history
    for got, want in zip(ddp_records, one_records):
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "param_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # each checkpoint and its single-writer lock marker (fastcurv/_io.py), nothing written by rank 1
    assert sorted(os.listdir(tmp_path)) == [".ddp.pt.lock", ".one.pt.lock", "ddp.pt", "one.pt"]


def test_fsdp_wrapped_models_are_refused_by_curvature_operators_and_metrics():
    """Same check without processes: a module whose class fully_shard rewrote (FSDP<cls>, as fully_shard does)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    from fastcurv import metrics
    from fastcurv.curvature import EmpiricalFisher, Hessian

    model = mlp()
    model[2].__class__ = type("FSDPLinear", (fsdp.FSDPModule, nn.Linear), {})
    x, y = batch("mlp")
    for call in (lambda: Hessian(model, F.cross_entropy, (x, y)), lambda: EmpiricalFisher(model, F.cross_entropy, (x, y)),
                 lambda: metrics.fisher_trace(model, x, y)):
        with pytest.raises(ValueError, match=r"module '2' is wrapped by FSDP \(FSDPLinear\); FSDP is not supported"):
            call()
