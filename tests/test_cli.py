"""The `fastcurv` command on tiny settings, in-process and once as a subprocess."""
import json
import os
import subprocess
import sys

import pytest

from fastcurv.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "xord", "--epochs", "2", "--seeds", "2", "--batch-size", "4", "--quiet"]


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastcurv ") and "reference=yes" in out and "backends" in out


def test_compare_in_process(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code = main(["compare", *TINY, "--rules", "sgd,l2,selective_l2", "--lam", "0.01",
                 "--set", "selective_l2.omega=0.2", "--out", str(out_dir)])
    assert code == 0
    text = capsys.readouterr().out
    for rule in ("sgd", "l2", "selective_l2"):
        assert rule in text
    assert "±" in text and "time/step vs sgd" in text
    results = json.loads((out_dir / "results.json").read_text())
    assert results["rules"]["l2"]["options"] == {"lam": 0.01}
    assert results["rules"]["selective_l2"]["options"] == {"lam": 0.01, "omega": 0.2}
    runs = results["rules"]["sgd"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and len(runs[0]["history"]) == 2
    assert "top_eigenvalue" in runs[0]["history"][0]
    assert results["rules"]["sgd"]["summary"]["relative_time"] == pytest.approx(1.0)
    # Same seed -> same initial model and batches for every rule: with lam=0 an L2 run equals SGD.
    assert (out_dir / "test_accuracy.png").stat().st_size > 0
    assert (out_dir / "top_eigenvalue.png").stat().st_size > 0


def test_compare_measures_every_rule_on_one_loss(tmp_path, capsys):
    """Rule fisher trains on the hinge loss; its sharpness and second gap must still be of the cross-entropy,
    like every other row, and each row says which loss it trained on."""
    import torch

    from fastcurv.data import load
    from fastcurv.train import evaluate, load_checkpoint, per_example_loss
    from fastcurv.train.loop import _curvature_record

    out_dir = tmp_path / "mixed"
    assert main(["compare", "--dataset", "xord", "--epochs", "1", "--seeds", "1", "--batch-size", "8", "--quiet",
                 "--rules", "sgd,fisher", "--no-plots", "--out", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "trained on" in table and "top Hessian eig, cross_entropy" in table and "gap, cross_entropy" in table
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines() if line.split()[:1] in (["sgd"], ["fisher"])}
    assert rows == {"sgd": "cross_entropy", "fisher": "hinge"}
    results = json.loads((out_dir / "results.json").read_text())
    assert results["sharpness_loss"] == "cross_entropy"
    assert results["rules"]["fisher"]["training_loss"] == "hinge"
    last = results["rules"]["fisher"]["runs"][0]["history"][-1]
    # Recompute on the saved model: the eigenvalue and the second gap are the cross-entropy's.
    state = load_checkpoint(out_dir / "checkpoints" / "fisher_seed0.pt")
    from fastcurv.cli import _model_for

    model = _model_for(state["model_spec"], 0)
    model.load_state_dict(state["model_state"])
    data = load("xord", seed=0)
    ce, hinge = per_example_loss("cross_entropy"), per_example_loss("hinge")
    gap_ce = evaluate(model, *data.test, ce, "classification")[0] - evaluate(model, *data.train, ce, "classification")[0]
    gap_hinge = evaluate(model, *data.test, hinge, "classification")[0] - evaluate(model, *data.train, hinge, "classification")[0]
    assert last["measure_gap"] == pytest.approx(gap_ce) and last["gap"] == pytest.approx(gap_hinge)
    expected = _curvature_record(model, data.x_train[:256], data.y_train[:256], ce, True, False, 0, 0)["top_eigenvalue"]
    assert last["top_eigenvalue"] == pytest.approx(expected, rel=1e-4)
    on_hinge = _curvature_record(model, data.x_train[:256], data.y_train[:256], hinge, True, False, 0, 0)["top_eigenvalue"]
    assert on_hinge != pytest.approx(expected, rel=1e-2)


def test_same_seed_same_start(tmp_path):
    out_dir = tmp_path / "same"
    assert main(["compare", *TINY, "--rules", "sgd,l2", "--lam", "0", "--no-plots", "--no-eigenvalue", "--out", str(out_dir)]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time_per_step", "epoch_time", "wall_time")} for r in h]  # noqa: E731
    for a, b in zip(results["rules"]["sgd"]["runs"], results["rules"]["l2"]["runs"]):
        assert strip(a["history"]) == strip(b["history"])


def test_regression_reports_error(tmp_path, capsys):
    out_dir = tmp_path / "reg"
    args = ["compare", "--dataset", "synthetic", "--rules", "sgd", "--epochs", "1", "--seeds", "1",
            "--lr", "1e-4", "--quiet", "--no-eigenvalue", "--no-plots", "--out", str(out_dir)]
    assert main(args) == 0
    assert "test_error" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["compare", "--rules", "sgd,adamw"], "unknown rule(s) 'adamw'; valid rules: sgd, l2, curvature"),
    (["compare", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid datasets: digits, xor"),
    (["compare", "--set", "l2.omega=1"], "rule 'l2' has no hyperparameter 'omega'; valid: lam"),
    (["compare", "--set", "l2lam=1"], "--set expects rule.key=value"),
    (["compare", "--after-first-drop"], "--after-first-drop needs --lr-drop"),
    (["compare", "--rules", "l2", "--lam", "-1"], "rule 'l2': L2: lam must be finite and >= 0"),
    (["train", "--rule", "nope", "--checkpoint", "x.pt"], "unknown rule 'nope'; valid rules"),
])
def test_bad_input(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path)] if args[0] == "compare" else args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["train", "--width", "0"], "--width must be an integer >= 1, got 0"),
    (["train", "--width", "-4"], "--width must be an integer >= 1, got -4"),
    (["train", "--curvature-samples", "0"], "--curvature-samples must be an integer >= 1, got 0"),
    (["train", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["train", "--lr", "0"], "--lr must be finite and > 0, got 0.0"),
    (["train", "--lr", "nan"], "--lr must be finite and > 0, got nan"),
    (["train", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["train", "--lr-drop", "0"], "--lr-drop must be an integer >= 1"),
    (["train", "--momentum", "-0.5"], "--momentum must be finite and >= 0"),
    (["train", "--rule", "curvature", "--set", "curvature.alpha=abc"],
     "--set 'curvature.alpha=abc': curvature.alpha must be a number (default 0.01), got 'abc'"),
    (["train", "--rule", "subbatch", "--set", "subbatch.exact=1"], "subbatch.exact must be True or False"),
    (["train", "--rule", "curvature", "--alpha", "-1"], "--alpha -1.0: rule 'curvature': "),
    (["train", "--rule", "l2", "--set", "l2.lam=-2"], "--set l2.lam=-2: rule 'l2': L2: lam must be finite and >= 0"),
    (["compare", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["compare", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["compare", "--width", "-4"], "--width must be an integer >= 1, got -4"),
    (["sharpness", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["sharpness", "--logdet-trials", "0"], "--logdet-trials must be >= 1, got 0"),
    (["sharpness", "--data-batches", "0"], "--data-batches must be >= 1, got 0"),
    (["train", "--statistics", "noise_scale,el2n"], "--statistics 'noise_scale,el2n': unknown 'el2n'; valid: noise_scale, grand"),
])
def test_every_bad_flag_is_one_line_naming_the_flag_before_training(args, message, capsys, tmp_path):
    """Exit 2, one line on stderr naming the flag, and nothing trained or written."""
    if args[0] == "train":
        args = [*args, "--dataset", "xord", "--quiet", "--checkpoint", str(tmp_path / "run" / "c.pt")]
    elif args[0] == "compare":
        args = [*args, "--dataset", "xord", "--quiet", "--out", str(tmp_path / "out")]
    else:
        args = [*args, str(tmp_path / "missing.pt")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert captured.out == "" and not (tmp_path / "out").exists() and not (tmp_path / "run" / "c.pt").exists()


def test_paths_are_checked_before_training(tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    base = ["train", "--dataset", "xord", "--quiet", "--epochs", "1", "--batch-size", "8"]
    assert main([*base, "--checkpoint", str(folder)]) == 2
    assert f"--checkpoint {str(folder)!r} is a directory" in capsys.readouterr().err
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    assert main(["compare", "--dataset", "xord", "--quiet", "--out", str(a_file)]) == 2
    assert f"--out {str(a_file)!r} is a file" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(a_file / "c.pt")]) == 2  # its folder would be a file
    assert "cannot create its folder" in capsys.readouterr().err


def test_train_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "run.pt")
    base = ["train", "--dataset", "xord", "--quiet", "--epochs", "1", "--batch-size", "8", "--checkpoint", ckpt]
    assert main(base) == 0
    capsys.readouterr()
    before = open(ckpt, "rb").read()
    assert main([*base, "--lr", "0.2"]) == 2
    assert "already exists; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert open(ckpt, "rb").read() == before
    assert main([*base, "--lr", "0.2", "--overwrite"]) == 0
    assert open(ckpt, "rb").read() != before


def test_damaged_checkpoints_give_one_line_errors(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    base = ["train", "--dataset", "xord", "--quiet", "--epochs", "2", "--batch-size", "8", "--checkpoint", str(ckpt)]
    assert main([*base, "--epochs", "1"]) == 0
    capsys.readouterr()
    raw = ckpt.read_bytes()
    for content, message in ((b"", "is empty"), (raw[: len(raw) // 3], "cannot be read: truncated"),
                             (b"not a checkpoint at all" * 50, "cannot be read")):
        ckpt.write_bytes(content)
        for args in ([*base, "--resume"], ["sharpness", str(ckpt)]):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err


def test_train_resume_and_sharpness(tmp_path, capsys):
    ckpt = str(tmp_path / "run.pt")
    base = ["train", "--dataset", "xord", "--rule", "l2", "--batch-size", "4", "--quiet", "--checkpoint", ckpt]
    assert main([*base, "--epochs", "3"]) == 0
    full = capsys.readouterr().out.strip().splitlines()
    os.remove(ckpt)
    assert main([*base, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--epochs", "3", "--resume"]) == 0
    resumed = capsys.readouterr().out.strip().splitlines()
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("time_per_step", "epoch_time", "wall_time")}  # noqa: E731
    assert [drop(line) for line in resumed] == [drop(line) for line in full]

    stats_ckpt = str(tmp_path / "stats.pt")
    assert main([*base[:-1], stats_ckpt, "--epochs", "1", "--statistics", "noise_scale,grand"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert {"noise_scale", "trace_covariance", "grand_mean", "grand_max"} <= set(record)
    assert any(key.startswith("noise_scale.") for key in record)

    assert main(["sharpness", ckpt, "--samples", "12"]) == 0
    out = capsys.readouterr().out
    assert "top Hessian eigenvalue" in out and "rule l2" in out and "epoch 3" in out
    for label in ("Hessian trace", "Fisher trace", "log-det metric", "robustness"):
        assert label in out
    assert "± " in out and "(residual bound)" in out and "(standard error over probes)" in out
    plot = tmp_path / "density.png"
    assert main(["sharpness", ckpt, "--samples", "12", "--density", str(plot)]) == 0
    assert "spectral density" in capsys.readouterr().out and plot.stat().st_size > 1000
    assert main(["sharpness", ckpt, "--samples", "4", "--data-batches", "3"]) == 0
    out = capsys.readouterr().out
    assert "over 3 disjoint batches of 4 examples" in out
    rows = [line for line in out.splitlines() if line.startswith("  top Hessian eigenvalue") or line.startswith("  Hessian trace")]
    assert len(rows) == 2 and all("± " in r and "range" in r for r in rows), out
    assert main(["sharpness", ckpt, "--samples", "5", "--data-batches", "3"]) == 2
    assert "needs 15 training examples; the data set has 12" in capsys.readouterr().err


def test_sharpness_of_foreign_file(tmp_path, capsys):
    import torch

    path = str(tmp_path / "w.pt")
    torch.save({"weights": 1}, path)
    assert main(["sharpness", path]) == 2
    assert "not a fastcurv checkpoint" in capsys.readouterr().err
    assert main(["sharpness", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_subprocess_module_entry(tmp_path):
    out_dir = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "fastcurv.cli", "compare", *TINY, "--rules", "sgd", "--no-plots",
         "--no-eigenvalue", "--out", str(out_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sgd" in proc.stdout and (out_dir / "results.json").exists()
    bad = subprocess.run([sys.executable, "-m", "fastcurv.cli", "compare", "--rules", "bogus"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "valid rules" in bad.stderr
