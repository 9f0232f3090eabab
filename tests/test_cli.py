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


def test_same_seed_same_start(tmp_path):
    out_dir = tmp_path / "same"
    assert main(["compare", *TINY, "--rules", "sgd,l2", "--lam", "0", "--no-plots", "--no-eigenvalue", "--out", str(out_dir)]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time_per_step", "epoch_time")} for r in h]  # noqa: E731
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
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("time_per_step", "epoch_time")}  # noqa: E731
    assert [drop(line) for line in resumed] == [drop(line) for line in full]

    assert main(["sharpness", ckpt, "--samples", "12"]) == 0
    out = capsys.readouterr().out
    assert "top Hessian eigenvalue" in out and "rule l2" in out and "epoch 3" in out
    for label in ("Hessian trace", "Fisher trace", "log-det metric", "robustness"):
        assert label in out


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
