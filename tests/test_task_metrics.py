"""Task metrics against values worked out by hand (in percent, as the paper reports)."""

import math

import numpy as np
import pytest

from gptjax.tasks import metrics

# Every test here also fails on a warning: degenerate inputs must not spam any.
pytestmark = pytest.mark.filterwarnings("error")


def test_accuracy():
    # Correct at positions 0, 1 and 3 of 5: 3 / 5 = 60%.
    result = metrics.compute(["accuracy"], [0, 1, 1, 0, 1], [0, 1, 0, 0, 0])
    assert result == {"accuracy": pytest.approx(60.0)}


# A binary case with this confusion matrix (rows: label, columns: prediction):
#              pred 1   pred 0
#   label 1    TP = 3   FN = 1
#   label 0    FP = 2   TN = 4
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDICTIONS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]


def test_f1_binary():
    # precision = 3 / 5, recall = 3 / 4; F1 = 2 TP / (2 TP + FP + FN) = 6 / 9 = 2/3.
    assert metrics.compute(["f1"], PREDICTIONS, LABELS)["f1"] == pytest.approx(200 / 3)


def test_f1_positive_class_is_one():
    # Swapping the classes: TP = 4 (old TN), FP = 1 (old FN), FN = 2 (old FP):
    # F1 = 8 / (8 + 1 + 2) = 8 / 11.
    flipped = metrics.compute(["f1"], [1 - p for p in PREDICTIONS], [1 - y for y in LABELS])
    assert flipped["f1"] == pytest.approx(800 / 11)


def test_mcc_binary():
    # (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))
    # = (12 - 2) / sqrt(5 * 4 * 6 * 5) = 10 / sqrt(600) = 1 / sqrt(6) = 0.408248...
    result = metrics.compute(["mcc"], PREDICTIONS, LABELS)
    assert result["mcc"] == pytest.approx(100 / math.sqrt(6))


def test_mcc_multiclass():
    # Labels [0, 1, 2, 0], predictions [0, 2, 1, 0]: c = 2 correct of s = 4; counts per
    # class t = (2, 1, 1) true and p = (2, 1, 1) predicted. Gorodkin's multi-class MCC:
    # (c s - sum t_k p_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    # = (8 - 6) / sqrt((16 - 6)(16 - 6)) = 2 / 10 = 0.2.
    assert metrics.compute(["mcc"], [0, 2, 1, 0], [0, 1, 2, 0])["mcc"] == pytest.approx(20.0)


def test_pearson():
    # x = [1, 2, 3, 4] (mean 2.5), y = [2, 4, 5, 9] (mean 5):
    # deviations dx = [-1.5, -0.5, 0.5, 1.5], dy = [-3, -1, 0, 4];
    # sum dx dy = 4.5 + 0.5 + 0 + 6 = 11, sum dx^2 = 5, sum dy^2 = 26;
    # r = 11 / sqrt(5 * 26) = 11 / sqrt(130) = 0.964764...
    result = metrics.compute(["pearson"], [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert result["pearson"] == pytest.approx(1100 / math.sqrt(130))


def test_spearman_with_ties():
    # Predictions [1, 2, 2, 3] rank as [1, 2.5, 2.5, 4] (tied values share the mean rank);
    # labels [10, 20, 30, 40] rank as [1, 2, 3, 4]. Pearson of the ranks (means 2.5):
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, -0.5, 0.5, 1.5];
    # sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5; rho = 4.5 / sqrt(22.5) = sqrt(0.9).
    result = metrics.compute(["spearman"], [1, 2, 2, 3], [10, 20, 30, 40])
    assert result["spearman"] == pytest.approx(100 * math.sqrt(0.9))


def test_spearman_is_rank_based():
    # A monotonic but non-linear relation: ranks agree exactly, Pearson does not.
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0]
    result = metrics.compute(["spearman", "pearson"], x, y)
    assert result["spearman"] == pytest.approx(100.0)
    assert result["pearson"] < 100.0


def test_several_metrics_in_the_order_asked():
    result = metrics.compute(("mcc", "accuracy", "f1"), PREDICTIONS, LABELS)
    assert list(result) == ["mcc", "accuracy", "f1"]
    assert result["accuracy"] == pytest.approx(70.0)  # (3 + 4) / 10
    assert all(isinstance(v, float) for v in result.values())


def test_perfect_and_inverse_predictions():
    y = np.array([0, 1, 0, 1, 1])
    perfect = metrics.compute(["accuracy", "f1", "mcc"], y, y)
    assert perfect == pytest.approx({"accuracy": 100.0, "f1": 100.0, "mcc": 100.0})
    assert metrics.compute(["mcc"], 1 - y, y)["mcc"] == pytest.approx(-100.0)
    scores = np.array([0.5, 1.5, 4.0])
    assert metrics.compute(["pearson"], -scores, scores)["pearson"] == pytest.approx(-100.0)


def test_constant_predictions_score_zero_without_warnings():
    # An untrained model often predicts one class: MCC's denominator is 0, F1 has no TP.
    labels = [0, 1, 1, 0]
    assert metrics.compute(["mcc"], [1, 1, 1, 1], labels) == {"mcc": 0.0}
    assert metrics.compute(["mcc"], [0, 1, 0, 1], [1, 1, 1, 1]) == {"mcc": 0.0}
    assert metrics.compute(["f1"], [0, 0, 0, 0], labels) == {"f1": 0.0}
    assert metrics.compute(["f1"], [0, 0], [0, 0]) == {"f1": 0.0}  # no positives at all
    # Constant scores: correlations are undefined (0 / 0); reported as 0.
    scores = [0.1, 0.7, 0.3]
    for name in ("pearson", "spearman"):
        assert metrics.compute([name], [2.0, 2.0, 2.0], scores) == {name: 0.0}
        assert metrics.compute([name], scores, [5.0, 5.0, 5.0]) == {name: 0.0}
        assert metrics.compute([name], [1.0], [2.0]) == {name: 0.0}  # a single example


def test_non_finite_predictions_give_nan():
    result = metrics.compute(["pearson", "spearman"], [1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    assert all(math.isnan(v) for v in result.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown metric.*'bleu'"):
        metrics.compute(["accuracy", "bleu"], [0], [0])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        metrics.compute(["accuracy"], [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.compute(["accuracy"], [], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.compute(["accuracy"], np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="f1 is binary"):
        metrics.compute(["f1"], [0, 2, 1], [0, 1, 1])
