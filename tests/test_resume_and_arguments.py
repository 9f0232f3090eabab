"""Resume only the run a checkpoint belongs to; MSE on class labels; every public argument checked once."""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcurv.cli import main
from fastcurv.train import ResumeMismatchError, fit

BASE = ["train", "--dataset", "xord", "--quiet", "--epochs", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "base.pt"
    assert main([*BASE, "--epochs", "1", "--checkpoint", str(path)]) == 0
    return path


@pytest.mark.parametrize("flags,named", [
    (["--activation", "relu"], "--activation: checkpoint 'tanh', now 'relu'"),
    (["--width", "7"], "--width: checkpoint the default, now 7"),
    (["--seed", "3"], "--seed: checkpoint 0, now 3"),
    (["--dataset", "xor"], "--dataset: checkpoint 'xord', now 'xor'"),
    (["--loss", "hinge"], "--loss: checkpoint 'cross_entropy', now 'hinge'"),
    (["--lr", "0.1"], "--lr: checkpoint 0.05, now 0.1"),
    (["--batch-size", "4"], "--batch-size: checkpoint 8, now 4"),
    (["--momentum", "0.5"], "--momentum: checkpoint 0.9, now 0.5"),
    (["--optimizer", "adam"], "--optimizer: checkpoint 'sgd', now 'adam'"),
    (["--init", "small"], "--init: checkpoint 'default'"),
    (["--lr-drop", "3"], "--lr-drop: checkpoint 'Constant"),
    (["--rule", "l2"], "--rule: checkpoint 'sgd', now 'l2'"),
    (["--curvature-samples", "5"], "--curvature-samples: checkpoint 256, now 5"),
    (["--track-eigenvalue"], "--track-eigenvalue: checkpoint False, now True"),
])
def test_resume_with_another_model_or_data_flag_is_refused_naming_it(one_epoch, tmp_path, flags, named, capsys):
    ckpt = tmp_path / "run.pt"
    shutil.copy(one_epoch, ckpt)
    before = ckpt.read_bytes()
    assert main([*BASE, *flags, "--checkpoint", str(ckpt), "--resume"]) == 2
    err = capsys.readouterr().err
    assert named in err and "was written by a different run" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "size mismatch" not in err
    assert ckpt.read_bytes() == before


def test_resume_of_a_rule_hyperparameter_names_its_flag(tmp_path, capsys):
    ckpt = str(tmp_path / "c.pt")
    base = [*BASE, "--rule", "curvature", "--checkpoint", ckpt]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--alpha", "0.05", "--resume"]) == 2
    assert "--alpha / --set curvature.alpha=...: checkpoint 0.01, now 0.05" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0  # the same flags continue it


def test_resume_and_overwrite_together_are_refused(one_epoch, capsys):
    before = one_epoch.read_bytes()
    assert main([*BASE, "--checkpoint", str(one_epoch), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err
    assert one_epoch.read_bytes() == before


def test_fit_refuses_to_resume_another_model_or_other_data(tmp_path):
    torch.manual_seed(0)
    data = (torch.randn(16, 2), torch.randint(0, 2, (16,)))
    ckpt = str(tmp_path / "run.pt")
    fit(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)), data, data, epochs=1, checkpoint=ckpt, progress=False)
    with pytest.raises(ResumeMismatchError, match=r"model: checkpoint 'module 1: Tanh', now 'module 1: ReLU'"):
        fit(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)), data, data, epochs=2, checkpoint=ckpt,
            resume=True, progress=False)
    other = (torch.randn(16, 2), data[1])
    with pytest.raises(ResumeMismatchError, match=r"data: checkpoint 'x_train: \(16, 2\) torch.float32 sha256"):
        fit(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)), other, other, epochs=2, checkpoint=ckpt,
            resume=True, progress=False)


def test_mse_on_class_labels_is_mse_on_one_hot_targets(tmp_path, capsys):
    from fastcurv.train import per_example_loss

    out, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    expected = ((out - F.one_hot(y, 3).double()) ** 2).mean(1)
    torch.testing.assert_close(per_example_loss("mse")(out, y), expected)
    with pytest.raises(ValueError, match=r"loss 'mse': the target of shape \(5, 2\).*does not match the output of shape \(5, 3\)"):
        per_example_loss("mse")(out, torch.randn(5, 2, dtype=torch.float64))
    assert main(["train", "--dataset", "xor", "--loss", "mse", "--quiet", "--epochs", "2", "--batch-size", "8",
                 "--checkpoint", str(tmp_path / "x.pt")]) == 0
    assert '"train_accuracy"' in capsys.readouterr().out
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    data = (torch.randn(32, 2), torch.randint(0, 2, (32,)))
    history = fit(model, data, data, loss="mse", epochs=2, progress=False)
    assert math.isfinite(history.last["train_loss"]) and "train_accuracy" in history.last


def _regularizer_cases():
    from fastcurv.regularizers import (Curvature, FisherNorm, GroupLasso, L2, Metric, SelectiveL2, SpectralNorm,
                                       SubBatchGradNorm)

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return [
        (lambda: Curvature(model, alpha=math.inf), ValueError, "Curvature: alpha must be finite and >= 0, got inf"),
        (lambda: Curvature(model, alpha="abc"), TypeError, r"Curvature: alpha must be a real number >= 0, got 'abc' \(str\)"),
        (lambda: Curvature(model, alpha=1e-2, strict="no"), TypeError, "Curvature: strict must be True or False"),
        (lambda: Curvature(model, alpha=1e-2, guard="loud"), ValueError, "guard must be one of"),
        (lambda: SelectiveL2(model, 1.0, omega=1.5), ValueError, r"SelectiveL2: omega must be finite and in \(0, 1\]"),
        (lambda: SelectiveL2(model, 1.0, omega=0), ValueError, "omega <= 0 none"),
        (lambda: Metric(model, 0.1, absolute="yes"), TypeError, "Metric: absolute must be True or False"),
        (lambda: L2(model, math.nan), ValueError, "L2: lam must be finite and >= 0, got nan"),
        (lambda: GroupLasso(model, "x"), TypeError, "GroupLasso: lam must be a real number"),
        (lambda: FisherNorm(model[2], gamma=math.inf), ValueError, "FisherNorm: gamma must be finite"),
        (lambda: SpectralNorm(model[2], 1.0, n_power_iterations=1.5), ValueError, "n_power_iterations must be an integer >= 1"),
        (lambda: SpectralNorm(model[2], 1.0, seed="s"), TypeError, "SpectralNorm: seed must be an integer"),
        (lambda: SubBatchGradNorm(model, exact="no"), TypeError, "SubBatchGradNorm: exact must be True or False"),
        (lambda: SubBatchGradNorm(model, num_subbatches=True), TypeError, "num_subbatches must be an integer"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_regularizer_arguments_are_checked_at_construction(case):
    build, error, message = _regularizer_cases()[case]
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize("kwargs,error,message", [
    ({"momentum": -1.0}, ValueError, "fit: momentum must be finite and >= 0, got -1.0"),
    ({"momentum": math.nan}, ValueError, "fit: momentum must be finite"),
    ({"init_scale": math.inf}, ValueError, "fit: init_scale must be finite and > 0"),
    ({"seed": 1.5}, ValueError, "fit: seed must be an integer"),
    ({"stop_after": -1}, ValueError, "fit: stop_after must be an integer >= 0 or None"),
    ({"track_eigenvalue": "yes"}, TypeError, "fit: track_eigenvalue must be True or False"),
    ({"lr": "fast"}, TypeError, "fit: lr must be a real number > 0"),
    ({"rule": "l2_stopped", "rule_options": {"tau": -2}}, ValueError, "rule 'l2_stopped': tau must be an integer >= 0"),
])
def test_fit_arguments_are_checked_naming_them(kwargs, error, message):
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    data = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
    with pytest.raises(error, match=message):
        fit(model, data, data, epochs=1, progress=False, **kwargs)


@pytest.mark.parametrize("flags,message", [
    (["--rule", "curvature", "--alpha", "inf"], "--alpha inf: rule 'curvature': Curvature: alpha must be finite and >= 0, got inf"),
    (["--rule", "selective_l2", "--omega", "5"], "--omega 5.0: rule 'selective_l2': SelectiveL2: omega must be finite and in (0, 1]"),
    (["--rule", "curvature", "--set", "curvature.alpha=1e999"], "Curvature: alpha must be finite and >= 0, got inf"),
    (["--rule", "l2_stopped", "--tau", "-1"], "rule 'l2_stopped': tau must be an integer >= 0"),
])
def test_cli_refuses_bad_hyperparameters_before_training(flags, message, tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    assert main([*BASE, *flags, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not ckpt.exists()
