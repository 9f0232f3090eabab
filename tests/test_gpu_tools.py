"""tools/gpu: the wheel checks and the fetch script, the per-test timeout fallback, and the summary's
target arithmetic. (The whole GPU script runs as `tools/gpu/run.sh --cpu-dry-run` in .ci/run.)"""
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "gpu"))
import check_wheels  # noqa: E402
import summarize  # noqa: E402


def fake_wheel(folder, name, version, requires=(), tag="py3-none-any"):
    path = os.path.join(folder, f"{name}-{version}-{tag}.whl")
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def all_pinned(folder):
    for name, version in check_wheels.pins().items():
        fake_wheel(folder, name.replace("-", "_"), version, requires=["torch>=2.0", "numpy", 'pytest; extra == "test"'])


def test_pins_are_pure_peers_and_never_torch():
    pins = check_wheels.pins()
    assert {"opacus", "backpack-for-pytorch", "curvlinops-for-pytorch", "pyhessian"} <= set(pins)
    assert not any(check_wheels.FORBIDDEN.match(n) for n in pins)
    image = check_wheels.image_packages()
    assert {"torch", "triton", "numpy", "scipy", "einops", "opt-einsum", "linear-operator"} <= image
    assert not set(pins) & image, "a pinned wheel the image already has would shadow the image's version"


def test_check_wheels_accepts_the_pinned_set(tmp_path):
    all_pinned(tmp_path)
    assert check_wheels.check(str(tmp_path), max_mib=8) == []


@pytest.mark.parametrize("fault", ["torch", "version", "missing", "requirement", "binary", "size"])
def test_check_wheels_names_each_fault(tmp_path, fault):
    all_pinned(tmp_path)
    if fault == "torch":
        fake_wheel(tmp_path, "torch", "2.11.0", tag="cp312-cp312-manylinux_2_28_x86_64")
        expect = "must not be carried"
    elif fault == "version":
        os.remove(next(p for p in tmp_path.iterdir() if p.name.startswith("opacus")))
        fake_wheel(tmp_path, "opacus", "0.0.1")
        expect = "wheels.txt pins"
    elif fault == "missing":
        os.remove(next(p for p in tmp_path.iterdir() if p.name.startswith("PyHessian") or p.name.startswith("pyhessian")))
        expect = "pinned but no wheel"
    elif fault == "requirement":
        os.remove(next(p for p in tmp_path.iterdir() if p.name.startswith("einconv")))
        fake_wheel(tmp_path, "einconv", check_wheels.pins()["einconv"], requires=["not-on-the-image>=1"])
        expect = "neither carried nor on the device image"
    elif fault == "binary":
        os.remove(next(p for p in tmp_path.iterdir() if p.name.startswith("unfoldNd") or p.name.startswith("unfoldnd")))
        fake_wheel(tmp_path, "unfoldNd", check_wheels.pins()["unfoldnd"], tag="cp311-cp311-manylinux_2_17_x86_64")
        expect = "not pure Python"
    else:
        assert check_wheels.check(str(tmp_path), max_mib=1e-6)
        return
    problems = check_wheels.check(str(tmp_path), max_mib=8)
    assert any(expect in p for p in problems), problems


def test_fetch_wheels_downloads_exactly_the_pins(tmp_path):
    """Needs PyPI: skipped when the script reports that it is offline (exit 2)."""
    done = subprocess.run(["bash", os.path.join(ROOT, "tools/gpu/fetch_wheels.sh"), str(tmp_path / "whl")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    if done.returncode == 2:
        pytest.skip(f"offline: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert check_wheels.check(str(tmp_path / "whl"), max_mib=8) == []
    total = sum(p.stat().st_size for p in (tmp_path / "whl").iterdir())
    assert total < 8 * 2**20


def test_timeout_fallback_fails_the_slow_test_and_runs_the_next(tmp_path):
    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""
        import time
        def test_a_slow():
            time.sleep(30)
        def test_b_quick():
            assert True
    """))
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tools", "gpu")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:timeout", "-p",
                           "pytest_timeout_fallback", "--fallback-timeout=1", str(tmp_path / "test_slow.py")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    assert "exceeded the per-test timeout of 1 s" in done.stdout


def contender(ms, **extra):
    return {"median_ms": ms, **extra}


def test_summary_targets(tmp_path):
    env = {"device": "gpu", "copy": {"GB_per_s": 4000.0}, "gemm": {"TFLOP_per_s": 780.0, "dtype": "bf16", "n": 8192}}
    groups = {
        "kernel-t1-fp32": {"contenders": {"cuda forward": contender(1, GB_per_s=3000.0),
                                          "triton forward": contender(1, GB_per_s=2500.0),
                                          "reference forward": contender(1, GB_per_s=3900.0)}},
        "norms-mlp": {"contenders": {"plain_fwd_bwd": contender(10), "fastcurv": contender(10.4),
                                     "torch_func": contender(100), "backpack": contender(20), "opacus": {"error": "x"}}},
        "regstep-mlp": {"contenders": {"plain_step": contender(10), "fastcurv_curvature": contender(17), "sam": contender(20)}},
        "hvp": {"contenders": {"H@V double_backward K=1": contender(3, gradient_equivalents_per_vector=3.0),
                               "H@V double_backward K=8": contender(10, gradient_equivalents_per_vector=1.25)}},
        "eigen-top10": {"contenders": {"fastcurv top_eigenvalues": contender(100, max_rel_error=1e-6),
                                       "pyhessian eigenvalues": contender(600, max_rel_error=1e-2)}},
        "kernel-gram": {"auto_picks": "triton", "fastest": "reference", "contenders": {}},
    }
    rows = {r["target"]: r for r in summarize.targets(env, {"groups": groups})}
    # the reference backend is not a kernel: the best kernel is cuda at 3000 / 4000 = 75%
    assert rows["T=1 norm kernel bandwidth (fp32)"]["met"] is True and "75%" in rows["T=1 norm kernel bandwidth (fp32)"]["value"]
    assert rows["T=1 norm kernel bandwidth (bf16)"]["met"] is None
    assert rows["norms / plain fwd+bwd, mlp"]["met"] is True  # 1.04x <= 1.05x
    assert rows["norms speed-up vs fastest peer, mlp"]["met"] is False  # backpack 20 / 10.4 = 1.92x < 2x
    assert "opacus" in rows["norms speed-up vs fastest peer, mlp"]["note"]
    assert rows["Curvature step / plain, mlp"]["met"] is False and rows["Curvature step vs SAM, mlp"]["met"] is True
    assert rows["HVP gradient-equivalents per vector, K >= 8"]["met"] is True
    assert rows["top-10 eigenvalues vs PyHessian"]["met"] is True  # 6x faster, smaller error
    assert rows["auto backend = fastest, kernel-gram"]["met"] is False
    assert rows["norms / plain fwd+bwd, gpt"]["met"] is None

    stages = tmp_path / "stages.tsv"
    stages.write_text("env\t0\t3.1\t90\ntests\t124\t240.0\t240\n")
    (tmp_path / "env.json").write_text(json.dumps(env))
    (tmp_path / "bench.json").write_text(json.dumps({"groups": groups}))
    out = tmp_path / "summary.json"
    assert summarize.main(["--stages", str(stages), "--env", str(tmp_path / "env.json"), "--bench",
                           str(tmp_path / "bench.json"), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert [s["rc"] for s in summary["stages"]] == [0, 124]
