"""lumctl/metrics.py by hand, each metric in one place: AUC (ties, pair counting), GAUC (impression
weights, one-class users skipped), logloss (clipping), HR/NDCG/MRR at the cut-off."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumctl.metrics import auc, ctr_metrics, gauc, logloss, retrieval_metrics


# ------------------------------------------------------------------------------ AUC
def test_auc_by_hand():
    # positives 0.9, 0.4 vs negatives 0.1, 0.4: 1 + 1 + 1 + 0.5 (tie) = 3.5 of 4 pairs
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.4]) == pytest.approx(0.875)
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert auc([0, 1], [0.3, 0.2]) == pytest.approx(0.0)
    assert np.isnan(auc([1, 1], [0.3, 0.2]))


def test_auc_with_tied_groups_by_hand():
    # scores: pos {3, 2, 2, 1}, neg {2, 1, 0}. Pairs (pos, neg): 3 beats all 3 -> 3; each 2 beats 1, 0
    # and ties 2 -> 2.5 (twice); 1 beats 0, ties 1 -> 1.5. Total 3 + 2.5 + 2.5 + 1.5 = 9.5 of 12.
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [3, 2, 2, 1, 2, 1, 0]
    assert auc(y, s) == pytest.approx(9.5 / 12)
    # the same data in another order, and as logits through ctr_metrics
    perm = [6, 2, 4, 0, 5, 1, 3]
    assert auc(np.array(y)[perm], np.array(s)[perm]) == pytest.approx(9.5 / 12)
    assert ctr_metrics(np.zeros(7), y, s)["auc"] == pytest.approx(9.5 / 12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=2, max_size=30))
def test_auc_matches_pair_counting(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], float)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        assert np.isnan(auc(y, s))
        return
    want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])
    assert auc(y, s) == pytest.approx(want)


# ------------------------------------------------------------------------------ GAUC
def test_gauc_weights_users_by_impressions_and_skips_one_class_users():
    # user 0: 4 impressions, pos 0.9, 0.2 vs neg 0.5, 0.2 -> pairs 1, 1, 0, 0.5 -> 2.5/4 = 0.625
    # user 1: 2 impressions, pos 0.1 vs neg 0.7 -> 0.0
    # user 2: 3 impressions, all positive -> skipped; user 3: 1 impression -> skipped
    user = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]
    y = [1, 1, 0, 0, 1, 0, 1, 1, 1, 0]
    s = [0.9, 0.2, 0.5, 0.2, 0.1, 0.7, 0.3, 0.3, 0.3, 0.4]
    assert gauc(user, y, s) == pytest.approx((4 * 0.625 + 2 * 0.0) / 6)
    # not the unweighted mean of per-user AUCs (0.3125)
    assert gauc(user, y, s) != pytest.approx((0.625 + 0.0) / 2)
    # string user ids; no user with both classes -> NaN
    assert gauc(["a", "a", "a", "b", "b"], [1, 0, 0, 1, 0], [0.2, 0.3, 0.1, 0.5, 0.1]) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    assert np.isnan(gauc(["a", "b"], [1, 0], [0.1, 0.2]))


# ------------------------------------------------------------------------------ logloss
def test_logloss_by_hand_with_clipping():
    assert logloss([1, 0, 1], [0.5, 0.25, 0.9]) == pytest.approx(-(math.log(0.5) + math.log(0.75) + math.log(0.9)) / 3)
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([0], [1.0]) == pytest.approx(-math.log(1e-7))


# ------------------------------------------------------------------------------ HR / NDCG / MRR
def test_hr_ndcg_mrr_at_the_cut_off_by_hand():
    # ranks 0 (top), 4 (5th), 5 (6th), 9 (10th), 10 (11th)
    r = np.array([0, 4, 5, 9, 10])
    m = retrieval_metrics(r, ks=(5, 10))
    assert m["hr@5"] == pytest.approx(2 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 5)
    assert m["hr@10"] == pytest.approx(4 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(7) + 1 / math.log2(11)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 5 + 1 / 6 + 1 / 10 + 1 / 11) / 5)
    assert m["n"] == 5
    assert retrieval_metrics(np.zeros(0, np.int64), ks=(10,)) == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0, "n": 0}
