"""fastcurv reproduce: the verdict statistics against scipy (float64 oracle), the verdict on synthetic
results with a known answer, and each paper's command end to end on the tiny budget."""
import json
import math

import numpy as np
import pytest

from fastcurv.reproduce import verdict
from fastcurv.reproduce.verdict import CONTRADICTED, INCONCLUSIVE, REPRODUCED


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, -4.0, 12.0])
def test_student_t_p_matches_scipy(t, df):
    stats = pytest.importorskip("scipy.stats")
    assert verdict.student_t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)


def test_paired_test_matches_scipy_ttest_rel():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=6), rng.normal(size=6)
    ours = verdict.paired_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert ours["t"] == pytest.approx(ref.statistic, rel=1e-10) and ours["p_t"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_sign_flip_p_exact():
    # All 4 differences positive: only the identity and the all-flipped sign pattern are as extreme.
    assert verdict.sign_flip_p([1.0, 2.0, 1.5, 1.2]) == pytest.approx(2 / 16)
    assert verdict.sign_flip_p([1.0, -1.0]) == 1.0


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    x, y = [1, 2, 2, 5, 3, 9], [0.1, 0.5, 0.4, 0.9, 0.2, 0.3]
    assert verdict.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(verdict.spearman([1, 1, 1], [1, 2, 3]))


def _noise(seed, n=8):
    return np.random.default_rng(seed).normal(size=n)


def test_verdict_known_answers():
    base = _noise(1)
    better = base + 0.5 + 0.05 * _noise(2)  # clearly higher on every seed
    assert verdict.claim("c", "", "ours", better, "base", base, "greater", "acc")["verdict"] == REPRODUCED
    assert verdict.claim("c", "", "ours", better, "base", base, "less", "err")["verdict"] == CONTRADICTED
    assert verdict.claim("c", "", "ours", _noise(3), "base", _noise(4), "greater", "acc")["verdict"] == INCONCLUSIVE


def test_identical_differences_do_not_make_two_seeds_significant():
    test = verdict.paired_test([1.0, 1.0], [0.0, 0.0])
    assert test["p_t"] == 0.5 and verdict.decide(test, "greater") == INCONCLUSIVE  # exact sign flip: 2 of 4
    assert verdict.decide(verdict.paired_test([1.0] * 6, [0.0] * 6), "greater") == REPRODUCED  # p = 2/64


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="equal length"):
        verdict.paired_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="'greater' or 'less'"):
        verdict.decide(verdict.paired_test([1.0, 2.0], [0.0, 0.0]), "bigger")


REQUIRES = {"geng": "mlxtend", "jia-su": "mnist1d", "fisher": "mlxtend", "jarvis": None}


@pytest.mark.parametrize("paper", list(REQUIRES))
def test_reproduce_end_to_end_tiny(paper, tmp_path, capsys):
    if REQUIRES[paper]:
        pytest.importorskip(REQUIRES[paper])
    from fastcurv.cli import main

    out = tmp_path / paper
    assert main(["reproduce", paper, "--budget", "tiny", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["paper"] == paper and results["budget"] == "tiny" and results["seeds"] == [0, 1]
    assert results["environment"]["torch"] and results["wall_time_s"] > 0
    assert results["claims"] and all(c["verdict"] in (REPRODUCED, CONTRADICTED, INCONCLUSIVE) for c in results["claims"])
    assert all(len(c["ours"]["values"]) == 2 for c in results["claims"])
    assert "paper" in printed and results["claims"][0]["claim"] in printed
    assert (out / "table.md").exists() and (out / "checkpoints" / ".gitignore").exists()
    for plot in results["plots"]:
        assert plot.endswith(".png")
    # --resume loads the finished runs: same numbers.
    assert main(["reproduce", paper, "--budget", "tiny", "--out", str(out), "--quiet", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [c["ours"]["values"] for c in again["claims"]] == [c["ours"]["values"] for c in results["claims"]]


def test_reproduce_refuses_one_seed(tmp_path, capsys):
    from fastcurv.cli import main

    assert main(["reproduce", "jarvis", "--budget", "tiny", "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 2" in capsys.readouterr().err


def test_geng_sweep_counts_a_diverged_grid_point_below_every_threshold(tmp_path):
    """A learning rate that blows up is a result of the Figure 1/2 sweep (the paper's point: alpha widens
    the trainable region), not a crash of the whole reproduction."""
    pytest.importorskip("mlxtend")
    from fastcurv.reproduce import geng
    from fastcurv.reproduce.common import Session
    from fastcurv.data import load

    session = Session(paper="geng", budget="tiny", seeds=[0], out=str(tmp_path), quiet=True)
    cfg = {**geng.BUDGETS["tiny"], "epochs": 2,
           "sweep": dict(lrs=[0.05, 1e6], weight_decays=[0.0], alphas=[0.0], thresholds=[0.0], seeds=1)}
    data = geng.subset(load("mnist5k"), cfg["n_train"], cfg["n_test"])
    result = geng._sweep(session, data, cfg)
    assert [d["lr"] for d in result["diverged"]] == [1e6]
    assert result["fraction_above"]["0.0"]["0.0"] == 0.5  # the finite point is >= 0, the diverged one is not


@pytest.mark.parametrize("budget", ["tiny", "quick", "full"])
def test_jia_su_budgets_fit_mnist1d(budget):
    """Scenario I draws the confusion set from the training examples after the clean ones: every budget
    must fit in MNIST-1D's 4,000 training examples (the full budget once asked for 4,500)."""
    from fastcurv.reproduce.jia_su import BUDGETS

    cfg = BUDGETS[budget]
    n_train = cfg["n_train"] or 4000
    assert cfg["char_train"] + max(cfg["confusion"]) <= n_train


def test_results_json_histories_are_thinned_not_truncated():
    from fastcurv.reproduce.common import MAX_STORED_EPOCHS, compact

    history = [{"epoch": e, "loss": 1.0 / e} for e in range(1, 1001)]
    kept = compact({"runs": {"sgd": [{"seed": 0, "history": history}]}})["runs"]["sgd"][0]["history"]
    assert len(kept) <= MAX_STORED_EPOCHS + 1
    assert kept[0]["epoch"] == 1 and kept[-1]["epoch"] == 1000  # first and last always kept
    steps = {b["epoch"] - a["epoch"] for a, b in zip(kept, kept[1:-1])}
    assert steps == {math.ceil(1000 / MAX_STORED_EPOCHS)}  # evenly spaced
    assert kept[-1]["loss"] == pytest.approx(1e-3, rel=1e-6)
    short = [{"epoch": e} for e in range(1, 31)]
    assert compact(short) == short  # short histories are left whole


def test_missing_values_are_left_out_not_ranked():
    """gamma_hat is NaN where the Gram matrix is singular: a NaN must drop out of the rank correlation
    (it used to be ranked as the largest value) and out of the paired test."""
    nan = math.nan
    assert verdict.spearman([nan, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert verdict.spearman([3.0, 1.0, 2.0, nan], [3.0, 1.0, 2.0, 0.0]) == pytest.approx(1.0)
    assert math.isnan(verdict.spearman([nan, nan, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]))  # < 3 pairs
    test = verdict.paired_test([1.0, nan, 1.2, 1.1], [0.0, 0.0, 0.1, 0.05])
    assert test["n"] == 3 and math.isfinite(test["p_t"])
    from fastcurv.reproduce.common import format_cell

    assert format_cell([1.0, nan, 3.0]) == "2.0000 ± 1.4142 (2 of 3 seeds)"
    assert format_cell([nan, nan]) == "n/a"
