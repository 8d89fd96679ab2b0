"""Statistics of the report by hand (the metrics themselves: tests/test_metrics.py): per-user values,
Student-t p-values, per-seed paired tests, the paired bootstraps, the log fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumctl.metrics import auc, retrieval_metrics
from lumctl.stats import (
    SortedAUC,
    bootstrap_mean_diff,
    bootstrap_ranking_diff,
    fit_log,
    paired_seeds,
    per_user,
    t_pvalue,
)


@pytest.mark.parametrize("metric", ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "mrr"])
def test_per_user_values_average_to_the_metric(metric):
    r = np.array([0, 4, 5, 9, 10, 300])
    assert per_user(r, metric).mean() == pytest.approx(retrieval_metrics(r, ks=(5, 10))[metric])


# ------------------------------------------------------------------------------ t-test
@pytest.mark.parametrize("t, df, p", [(12.706, 1, 0.05), (4.303, 2, 0.05), (3.182, 3, 0.05), (2.776, 4, 0.05),
                                      (2.571, 5, 0.05), (2.228, 10, 0.05), (9.925, 2, 0.01), (1.0, 1, 0.5),
                                      (0.0, 3, 1.0)])
def test_t_pvalue_matches_the_t_table(t, df, p):
    assert t_pvalue(t, df) == pytest.approx(p, abs=2e-4)
    assert t_pvalue(-t, df) == pytest.approx(p, abs=2e-4)


def test_paired_seeds_by_hand():
    # differences 0.02, 0.04, 0.00 on seeds 0, 1, 2 (seed 3 only in a: ignored)
    a = {0: 0.52, 1: 0.54, 2: 0.50, 3: 0.9}
    b = {0: 0.50, 1: 0.50, 2: 0.50}
    r = paired_seeds(a, b)
    assert r["seeds"] == [0, 1, 2] and r["n"] == 3 and r["better"] == 2
    assert r["mean"] == pytest.approx(0.02)
    assert r["std"] == pytest.approx(0.02)                     # sqrt((0 + 0.0004 + 0.0004) / 2)
    assert r["t"] == pytest.approx(0.02 / (0.02 / math.sqrt(3)))
    assert r["p"] == pytest.approx(t_pvalue(math.sqrt(3), 2))
    assert paired_seeds({0: 1.0}, {1: 1.0}) is None
    one = paired_seeds({0: 0.6}, {0: 0.5})
    assert one["n"] == 1 and one["p"] is None and one["mean"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------ bootstrap
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=25))
def test_weighted_auc_equals_auc_of_the_repeated_samples(rows):
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows], float)
    w = np.array([r[2] for r in rows])
    rep = np.repeat(np.arange(len(rows)), w)
    want = auc(y[rep], s[rep])
    got = SortedAUC(y, s)(w)
    assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want)


def test_bootstrap_of_a_constant_difference_is_exact():
    b = bootstrap_mean_diff(np.full(50, 0.25), reps=200, seed=0, confidence=0.95)
    assert b["delta"] == b["lo"] == b["hi"] == pytest.approx(0.25) and b["p"] == 0.0


def test_bootstrap_interval_matches_the_normal_approximation():
    d = np.random.default_rng(0).normal(0.1, 1.0, 2000)          # se = 1 / sqrt(2000) = 0.0224
    b = bootstrap_mean_diff(d, reps=2000, seed=1, confidence=0.95)
    se = d.std() / math.sqrt(len(d))
    assert b["delta"] == pytest.approx(d.mean())
    assert b["lo"] == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)
    assert b["hi"] == pytest.approx(d.mean() + 1.96 * se, abs=0.25 * se)
    assert b["p"] < 0.01                                          # the mean is > 3 standard errors from 0
    null = bootstrap_mean_diff(d - d.mean(), reps=500, seed=1, confidence=0.95)
    assert null["lo"] < 0 < null["hi"] and null["p"] > 0.5


def test_ranking_bootstrap_is_paired_over_users():
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(200), 5)
    y = rng.random(1000) < 0.5
    good = y + rng.normal(0, 1.0, 1000)                           # informative logits
    noise = rng.normal(0, 1.0, (1, 1000))
    same = bootstrap_ranking_diff(user, y, good[None], good[None], "auc", reps=100, seed=0, confidence=0.95)
    assert same["delta"] == same["lo"] == same["hi"] == 0.0
    b = bootstrap_ranking_diff(user, y, good[None], noise, "auc", reps=200, seed=0, confidence=0.95)
    assert b["delta"] == pytest.approx(auc(y, good) - auc(y, noise[0]))
    assert b["lo"] > 0 and b["p"] < 0.01
    ll = bootstrap_ranking_diff(user, y, np.zeros((2, 1000)), np.zeros((1, 1000)), "logloss", 50, 0, 0.95)
    assert ll["delta"] == pytest.approx(0.0) and ll["lo"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------ scaling fit
def test_exact_log_fit_recovers_a_b_and_r2_1():
    x = np.array([1e4, 1e5, 3e5, 1e6, 1e7])
    f = fit_log(x, 0.013 * np.log(x) + 0.05)
    assert f["a"] == pytest.approx(0.013) and f["b"] == pytest.approx(0.05) and f["r2"] == pytest.approx(1.0)
    assert f["per_10x"] == pytest.approx(0.013 * math.log(10)) and f["n"] == 5


def test_log_fit_r2_by_hand():
    # ln x = 0, 1, 2 -> y = 0, 2, 1: slope 0.5, intercept 0.5, residuals -0.5, 1, -0.5
    x = np.exp([0.0, 1.0, 2.0])
    f = fit_log(x, [0.0, 2.0, 1.0])
    assert f["a"] == pytest.approx(0.5) and f["b"] == pytest.approx(0.5)
    assert f["r2"] == pytest.approx(1 - 1.5 / 2.0)
    with pytest.raises(ValueError):
        fit_log([5.0, 5.0], [0.1, 0.2])
