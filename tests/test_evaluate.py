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
    # and it is the highest such threshold: any higher one misses the target
    higher = prob[prob > t]
    if len(higher):
        t2 = higher.min()
        assert ((prob >= t2) & (y == 1)).sum() / y.sum() < target


def test_threshold_needs_positives():
    with pytest.raises(ValueError, match="no crack images"):
        threshold_for_recall(np.zeros(5), np.linspace(0, 1, 5), 0.9)
