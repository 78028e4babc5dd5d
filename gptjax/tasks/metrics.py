"""Scores of a task's predictions, in percent as the paper reports them (e.g. 45.4).

``compute(names, predictions, labels)`` knows:

* ``accuracy``: percent of predictions equal to the label (classes or chosen answers).
* ``f1``: binary F1 with class 1 as the positive class (MRPC, QQP).
* ``mcc``: Matthews correlation coefficient x 100 (CoLA); any number of classes.
* ``pearson``, ``spearman``: correlation x 100 of predicted and true scores (STS-B).

Degenerate (but finite) inputs give a number, never nan or a warning, because a
fine-tuning run evaluates often and an untrained model commonly predicts one class or one
score:

* ``mcc`` is 0 when the predictions or the labels are all one class (the coefficient's
  denominator is 0; 0 is scikit-learn's convention and "no better than chance").
* ``f1`` is 0 when no example is predicted or labelled positive (no true positives).
* ``pearson`` and ``spearman`` are 0 when the predictions or the labels are constant, or
  there are fewer than 2 examples (the correlation is undefined: no linear or monotonic
  relation can be measured). Non-finite predictions (a diverged model) give nan.

scikit-learn and scipy are imported when a score is first computed, not with this module:
`scipy.stats` alone takes 1-2 s to import, which every process that merely imports the
fine-tuning code would pay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["METRICS", "compute"]


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    import sklearn.metrics

    return float(sklearn.metrics.accuracy_score(labels, predictions))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    for what, values in (("predictions", predictions), ("labels", labels)):
        extra = set(np.unique(values).tolist()) - {0, 1}
        if extra:
            raise ValueError(f"f1 is binary (classes 0 and 1) but the {what} include {extra}")
    import sklearn.metrics

    # With no positive among labels and predictions, precision and recall are 0/0;
    # zero_division=0 makes that an F1 of 0 without a warning.
    return float(
        sklearn.metrics.f1_score(
            labels, predictions, labels=[0, 1], pos_label=1, average="binary", zero_division=0
        )
    )


def _one_value(values: np.ndarray) -> bool:
    return values.size == 0 or bool(np.all(values == values.flat[0]))


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    # Checked here rather than left to scikit-learn, which warns about a single label.
    if _one_value(predictions) or _one_value(labels):
        return 0.0
    import sklearn.metrics

    return float(sklearn.metrics.matthews_corrcoef(labels, predictions))


def _correlation(statistic: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The correlation `scipy.stats.<statistic>` of predictions and labels."""

    def correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
        predictions = predictions.astype(np.float64)
        labels = labels.astype(np.float64)
        if not (np.all(np.isfinite(predictions)) and np.all(np.isfinite(labels))):
            return float("nan")
        # scipy returns nan with a ConstantInputWarning (or raises for n < 2) here.
        if predictions.size < 2 or _one_value(predictions) or _one_value(labels):
            return 0.0
        import scipy.stats

        return float(getattr(scipy.stats, statistic)(predictions, labels).statistic)

    return correlation


# Each maps (predictions, labels) to a fraction; `compute` scales it to percent.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _correlation("pearsonr"),
    "spearman": _correlation("spearmanr"),
}


def compute(names: Sequence[str], predictions, labels) -> dict[str, float]:
    """The metrics `names` of `predictions` against `labels`, in percent, in that order.

    Predictions and labels are 1-D array-likes of the same length: class indices (or the
    indices of the chosen answers) for accuracy, f1 and mcc; scores for pearson and
    spearman. Raises ValueError for an unknown name, mismatched lengths or no examples.
    """
    if isinstance(names, str):
        names = (names,)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        # E.g. logits passed instead of their argmax: flattening would score nonsense.
        raise ValueError(
            f"predictions and labels must be 1-D, got shapes {predictions.shape} and {labels.shape}"
        )
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.size} predictions but {labels.size} labels")
    if predictions.size == 0:
        raise ValueError("no predictions to score")
    return {name: 100.0 * METRICS[name](predictions, labels) for name in names}
