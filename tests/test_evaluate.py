"""Metrics, intervals and threshold choice."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from crackscan.evaluate import compute_metrics, threshold_for_recall, wilson


def test_metrics_match_definitions_and_intervals_contain_them():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    prob = np.clip(y * 0.6 + rng.normal(0.2, 0.25, 400), 0, 1)
    m = compute_metrics(y, prob, 0.5, n_boot=200)
    pred = prob >= 0.5
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, prob))
    c = m["confusion"]
    assert c["tp"] + c["fn"] == y.sum() and sum(c.values()) == 400
    assert m["recall"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        lo, hi = m[f"{name}_ci"]
        assert lo <= m[name] <= hi and hi - lo < 0.2, name


def test_cluster_bootstrap_is_wider_for_correlated_groups():
    rng = np.random.default_rng(1)
    # 20 groups of 20 images whose errors are shared within a group.
    y = np.repeat(rng.integers(0, 2, 20), 20)
    noise = np.repeat(rng.normal(0, 0.35, 20), 20)
    prob = np.clip(y * 0.5 + 0.25 + noise, 0, 1)
    groups = np.repeat([f"g{i}" for i in range(20)], 20)
    by_image = compute_metrics(y, prob, 0.5, n_boot=300)
    by_group = compute_metrics(y, prob, 0.5, groups=list(groups), n_boot=300)
    width = lambda m: m["f1_ci"][1] - m["f1_ci"][0]  # noqa: E731
    assert width(by_group) > 1.5 * width(by_image)


def test_f1_interval_leaves_out_resamples_without_cracks():
    # Perfect answers on 6 photos, 2 with cracks: many resamples hold no crack and no crack predicted, whose F1
    # is undefined; counted as 0 they dragged the interval of a perfect F1 down to [0, 1].
    y = np.array([1, 1, 0, 0, 0, 0] * 5)
    groups = [f"photo{i}" for i in range(6)] * 5
    m = compute_metrics(y, y.astype(float), 0.5, groups=groups, n_boot=300)
    assert m["f1"] == 1.0 and m["f1_ci"] == (1.0, 1.0)


def test_wilson_interval():
    lo, hi = wilson(95, 100)
    assert 0.88 < lo < 0.9 and 0.97 < hi < 0.99
    assert wilson(100, 100)[1] == 1.0


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_threshold_reaches_the_target_recall(target):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    prob = np.clip(y * 0.4 + rng.uniform(0, 0.6, 300), 0, 1)
    t = threshold_for_recall(y, prob, target)
    recall = ((prob >= t) & (y == 1)).sum() / y.sum()
    assert recall >= target
    # As few false alarms as the target allows: the next score above it misses the target ...
    above = prob[prob >= t].min()
    assert ((prob > above) & (y == 1)).sum() / y.sum() < target
    # ... and it lies in the middle of its gap between two scores, not on either of them.
    below = prob[prob < t].max()
    assert t == pytest.approx((above + below) / 2)


@pytest.mark.parametrize("target", [0.07, 0.29, 0.57, 0.58])
def test_threshold_for_recall_counts_despite_rounding(target):
    # 100 positives scoring 1.00, 0.99, ...: recall target*100 is reached first at the (target*100)-th score.
    # (target * 100 is not exact in floating point for these: 7.000000000000001, 28.999999999999996, ...)
    prob = np.linspace(1.0, 0.01, 100)
    k = round(target * 100)
    threshold = threshold_for_recall(np.ones(100, int), prob, target)
    assert prob[k] < threshold < prob[k - 1] and (prob >= threshold).sum() == k


def test_threshold_for_recall_of_saturated_scores_is_not_one():
    # A confident model: every validation crack scores exactly 1.0 in float32. Recall 1.0 is reached anywhere
    # above the highest crack-free score; at 1.0 itself a crack scoring 0.99999988 would be missed.
    prob = np.array([1.0] * 20 + [0.2, 0.05, 0.001], dtype=np.float32)
    y = np.array([1] * 20 + [0] * 3)
    assert threshold_for_recall(y, prob, 1.0) == pytest.approx(0.6)
    assert threshold_for_recall(np.ones(3, int), np.ones(3, np.float32), 0.9) == 0.5  # nothing below: middle of (0, 1]


def test_threshold_needs_positives():
    with pytest.raises(ValueError, match="no crack images"):
        threshold_for_recall(np.zeros(5), np.linspace(0, 1, 5), 0.9)


def test_vectorised_bootstrap_matches_a_plain_resampling_loop():
    from sklearn.metrics import f1_score

    from crackscan.evaluate import bootstrap_ci

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    prob = np.round(np.clip(y * 0.3 + rng.uniform(0, 0.7, 120), 0, 1), 2)  # rounded: ties on purpose
    pred = (prob >= 0.5).astype(int)
    groups = [f"g{i // 6:02d}" for i in range(120)]  # names sort in index order, as the draw below assumes
    fast = bootstrap_ci(y, prob, pred, groups, n=400, seed=1)
    # The same resamples, drawn one by one and scored with scikit-learn.
    draw = np.random.default_rng(1).multinomial(20, np.full(20, 1 / 20), size=400)
    f1s, aucs = [], []
    for counts in draw:
        pick = np.concatenate([np.repeat(np.arange(g * 6, g * 6 + 6)[None], c, 0).ravel() for g, c in enumerate(counts)])
        f1s.append(f1_score(y[pick], pred[pick], zero_division=0))
        aucs.append(roc_auc_score(y[pick], prob[pick]))
    assert fast["f1_ci"] == pytest.approx(tuple(np.percentile(f1s, [2.5, 97.5])), abs=1e-9)
    assert fast["roc_auc_ci"] == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])), abs=1e-9)
