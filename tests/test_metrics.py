"""Keras 3 metrics: values from the documented formulas (scikit-learn where its definition agrees),
accumulation over batches and sample weights, History names, both backends, save/load."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

import gpunn
from gpunn import metrics
from gpunn._cuda import cuda_status
from gpunn.layers import Dense

from helpers import CountingBackend

EPS = 1e-7


def _batched(metric, y_true, y_pred, sample_weight=None, batch=7):
    """Feed ``metric`` in ragged batches (accumulation must not depend on the split)."""
    metric.reset_state()
    for start in range(0, len(y_pred), batch):
        sw = None if sample_weight is None else sample_weight[start : start + batch]
        metric.update_state(y_true[start : start + batch], y_pred[start : start + batch], sample_weight=sw)
    return metric.result()


# ------------------------------------------------------- the Keras documentation's examples
KERAS_DOC_EXAMPLES = [
    # (metric, y_true, y_pred, sample_weight, documented result)
    (lambda: metrics.AUC(num_thresholds=3), [0, 0, 1, 1], [0, 0.5, 0.3, 0.9], None, 0.75),
    (lambda: metrics.AUC(num_thresholds=3), [0, 0, 1, 1], [0, 0.5, 0.3, 0.9], [1, 0, 0, 1], 1.0),
    (metrics.Precision, [0, 1, 1, 1], [1, 0, 1, 1], None, 2 / 3),
    (metrics.Precision, [0, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], 1.0),
    (lambda: metrics.Precision(top_k=2), [[0, 0, 1, 1]], [[1, 1, 1, 1]], None, 0.0),
    (lambda: metrics.Precision(top_k=4), [[0, 0, 1, 1]], [[1, 1, 1, 1]], None, 0.5),
    (metrics.Recall, [0, 1, 1, 1], [1, 0, 1, 1], None, 2 / 3),
    (metrics.Recall, [0, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], 1.0),
    (lambda: metrics.TopKCategoricalAccuracy(k=1), [[0, 0, 1], [0, 1, 0]], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]], None, 0.5),
    (lambda: metrics.TopKCategoricalAccuracy(k=1), [[0, 0, 1], [0, 1, 0]], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]], [0.7, 0.3], 0.3),
    (lambda: metrics.SparseTopKCategoricalAccuracy(k=1), [2, 1], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]], None, 0.5),
    (lambda: metrics.SparseTopKCategoricalAccuracy(k=1), [2, 1], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]], [0.7, 0.3], 0.3),
    (metrics.RootMeanSquaredError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], None, 0.5),
    (metrics.RootMeanSquaredError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], [1, 0], 0.70710677),
    (metrics.MeanAbsolutePercentageError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], None, 250000000.0),
    (metrics.MeanAbsolutePercentageError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], [1, 0], 500000000.0),
    (metrics.MeanSquaredLogarithmicError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], None, 0.12011322),
    (metrics.MeanSquaredLogarithmicError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], [1, 0], 0.24022643),
    (metrics.BinaryCrossentropy, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], None, 0.81492424),
    (metrics.BinaryCrossentropy, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], [1, 0], 0.9162905),
    (metrics.CategoricalCrossentropy, [[0, 1, 0], [0, 0, 1]], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]], None, 1.1769392),
    (metrics.CategoricalCrossentropy, [[0, 1, 0], [0, 0, 1]], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]], [0.3, 0.7], 1.6271976),
    (metrics.SparseCategoricalCrossentropy, [1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]], None, 1.1769392),
    (metrics.SparseCategoricalCrossentropy, [1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]], [0.3, 0.7], 1.6271976),
    (metrics.R2Score, [[1], [4], [3]], [[2], [4], [4]], None, 0.57142854),
    (metrics.Hinge, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], None, 1.3),
    (metrics.Hinge, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], [1, 0], 1.1),
    (metrics.SquaredHinge, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], None, 1.86),
    (metrics.SquaredHinge, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], [1, 0], 1.46),
    (metrics.CategoricalHinge, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], None, 1.4000001),
    (metrics.CategoricalHinge, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], [1, 0], 1.2),
    (metrics.KLDivergence, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], None, 0.45814306),
    (metrics.KLDivergence, [[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]], [1, 0], 0.9162892),
    (metrics.Poisson, [[0, 1], [0, 0]], [[1, 1], [0, 0]], None, 0.49999997),
    (metrics.Poisson, [[0, 1], [0, 0]], [[1, 1], [0, 0]], [1, 0], 0.99999994),
    (metrics.LogCoshError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], None, 0.10844523),
    (metrics.LogCoshError, [[0, 1], [0, 0]], [[1, 1], [0, 0]], [1, 0], 0.21689045),
    (metrics.CosineSimilarity, [[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], None, 0.49999997),
    (metrics.CosineSimilarity, [[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], [0.3, 0.7], 0.6999999),
    (metrics.TruePositives, [0, 1, 1, 1], [1, 0, 1, 1], None, 2.0),
    (metrics.TruePositives, [0, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], 1.0),
    (metrics.FalsePositives, [0, 1, 0, 0], [0, 0, 1, 1], None, 2.0),
    (metrics.FalsePositives, [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0], 1.0),
    (metrics.TrueNegatives, [0, 1, 0, 0], [1, 1, 0, 0], None, 2.0),
    (metrics.TrueNegatives, [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], 1.0),
    (metrics.FalseNegatives, [0, 1, 1, 1], [0, 1, 0, 0], None, 2.0),
    (metrics.FalseNegatives, [0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], 1.0),
    (metrics.Accuracy, [[1], [2], [3], [4]], [[0], [2], [3], [4]], None, 0.75),
    (metrics.Accuracy, [[1], [2], [3], [4]], [[0], [2], [3], [4]], [1, 1, 0, 0], 0.5),
]


@pytest.mark.parametrize("make, y_true, y_pred, sample_weight, documented", KERAS_DOC_EXAMPLES)
def test_keras_documentation_examples(make, y_true, y_pred, sample_weight, documented):
    metric = make()
    metric.update_state(y_true, y_pred, sample_weight=sample_weight)
    assert metric.result() == pytest.approx(documented, rel=2e-6)  # the documented values are float32


def test_keras_documentation_examples_f1_and_mean():
    f1 = metrics.F1Score(threshold=0.5)
    f1.update_state([[1, 1, 1], [1, 0, 0], [1, 1, 0]], [[0.2, 0.6, 0.7], [0.2, 0.6, 0.6], [0.6, 0.8, 0.0]])
    np.testing.assert_allclose(f1.result(), [0.5, 0.8, 0.6666667], rtol=1e-6)
    mean = metrics.Mean()
    mean.update_state([1, 3, 5, 7])
    assert mean.result() == 4.0
    mean.reset_state()
    mean.update_state([1, 3, 5, 7], sample_weight=[1, 1, 0, 0])
    assert mean.result() == 2.0


# ---------------------------------------------------------------------------- AUC
def _bucketed_scores(rng, n, num_thresholds=200):
    """Distinct scores, one per interval between AUC's thresholds i / (T - 1): then the
    trapezoid over Keras's thresholds is the exact ROC curve, as scikit-learn computes it."""
    cells = rng.choice(num_thresholds - 1, size=n, replace=False)
    return (cells + rng.uniform(0.2, 0.8, n)) / (num_thresholds - 1)


def test_auc_roc_matches_sklearn_with_weights_and_batches():
    rng = np.random.default_rng(0)
    scores = _bucketed_scores(rng, 150)
    labels = (rng.uniform(size=150) < scores).astype(float)
    weights = rng.uniform(0.1, 2.0, 150)
    assert _batched(metrics.AUC(), labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    got = _batched(metrics.AUC(), labels, scores, weights)
    assert got == pytest.approx(skm.roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12)


def test_auc_from_logits_and_multi_label():
    rng = np.random.default_rng(1)
    scores = np.stack([_bucketed_scores(rng, 60) for _ in range(3)], axis=1)
    labels = (rng.uniform(size=scores.shape) < scores).astype(float)
    logits = np.log(scores / (1 - scores))
    pooled = skm.roc_auc_score(labels.ravel(), scores.ravel())
    # pooled over outputs (Keras's default): ties across columns make this only approximately exact
    assert _batched(metrics.AUC(from_logits=True), labels, logits) == pytest.approx(pooled, abs=5e-3)
    per_label = [skm.roc_auc_score(labels[:, j], scores[:, j]) for j in range(3)]
    assert _batched(metrics.AUC(multi_label=True), labels, scores) == pytest.approx(np.mean(per_label), abs=1e-12)
    lw = np.array([0.5, 2.0, 1.0])
    got = _batched(metrics.AUC(multi_label=True, label_weights=lw), labels, scores)
    assert got == pytest.approx(np.dot(per_label, lw) / lw.sum(), abs=1e-12)


def _confusion_by_threshold(labels, scores, thresholds):
    """tp, fp, fn, tn at each threshold, a prediction being positive when score > threshold."""
    out = []
    for t in thresholds:
        pos = scores > t
        out.append(
            (np.sum(pos & (labels == 1)), np.sum(pos & (labels == 0)), np.sum(~pos & (labels == 1)), np.sum(~pos & (labels == 0)))
        )
    return np.array(out, dtype=float).T


def _keras_thresholds(n):
    return [-EPS] + [(i + 1) / (n - 1) for i in range(n - 2)] + [1 + EPS]


def test_auc_pr_interpolation_follows_davis_goadrich():
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=80)
    labels = (rng.uniform(size=80) < scores).astype(float)
    tp, fp, fn, _ = _confusion_by_threshold(labels, scores, _keras_thresholds(11))
    expected = 0.0
    for i in range(10):  # Keras's AUC docs: interpolate precision between consecutive thresholds
        dtp, p0, p1 = tp[i] - tp[i + 1], tp[i] + fp[i], tp[i + 1] + fp[i + 1]
        if p0 - p1 <= 0 or tp[i + 1] + fn[i + 1] <= 0:
            continue
        slope = dtp / (p0 - p1)
        intercept = tp[i + 1] - slope * p1
        log_ratio = np.log(p0 / p1) if p0 > 0 and p1 > 0 else 0.0
        expected += slope * (dtp + intercept * log_ratio) / (tp[i + 1] + fn[i + 1])
    assert _batched(metrics.AUC(num_thresholds=11, curve="PR"), labels, scores) == pytest.approx(expected, rel=1e-12)
    perfect = metrics.AUC(curve="PR")
    perfect.update_state([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert perfect.result() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "curve, method",  # PR with interpolation is Davis-Goadrich's, tested above
    [("ROC", "minoring"), ("ROC", "majoring"), ("ROC", "interpolation"), ("PR", "minoring"), ("PR", "majoring")],
)
def test_auc_riemann_sums(curve, method):
    rng = np.random.default_rng(3)
    scores = rng.uniform(size=50)
    labels = (rng.uniform(size=50) < scores).astype(float)
    thresholds = [0.25, 0.5, 0.75]
    tp, fp, fn, tn = _confusion_by_threshold(labels, scores, [-EPS, *thresholds, 1 + EPS])
    with np.errstate(invalid="ignore"):
        recall = np.nan_to_num(tp / (tp + fn))
        x, y = (np.nan_to_num(fp / (fp + tn)), recall) if curve == "ROC" else (recall, np.nan_to_num(tp / (tp + fp)))
    pick = {"minoring": np.minimum, "majoring": np.maximum, "interpolation": lambda a, b: (a + b) / 2}[method]
    expected = np.sum((x[:-1] - x[1:]) * pick(y[:-1], y[1:]))
    metric = metrics.AUC(curve=curve, summation_method=method, thresholds=thresholds)
    assert metric.num_thresholds == 5
    assert _batched(metric, labels, scores) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ regression
def test_rmse_r2_mape_msle():
    rng = np.random.default_rng(4)
    y = rng.uniform(0.5, 3.0, (40, 2))
    p = y + rng.normal(0, 0.4, (40, 2))
    w = rng.uniform(0.1, 2.0, 40)
    assert _batched(metrics.RootMeanSquaredError(), y, p) == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)), rel=1e-12)
    assert _batched(metrics.RootMeanSquaredError(), y, p, w) == pytest.approx(
        np.sqrt(skm.mean_squared_error(y, p, sample_weight=w)), rel=1e-12
    )
    for aggregation, sk in (("uniform_average", "uniform_average"), ("variance_weighted_average", "variance_weighted"), (None, "raw_values")):
        got = _batched(metrics.R2Score(class_aggregation=aggregation), y, p, w)
        np.testing.assert_allclose(got, skm.r2_score(y, p, sample_weight=w, multioutput=sk), rtol=1e-10)
    r2 = skm.r2_score(y, p)
    adjusted = 1 - (1 - r2) * (40 - 1) / (40 - 3 - 1)
    assert _batched(metrics.R2Score(num_regressors=3), y, p) == pytest.approx(adjusted, rel=1e-12)
    # y > 0 here, so Keras's max(|y|, 1e-7) is |y|: scikit-learn's MAPE (a fraction) times 100
    assert _batched(metrics.MeanAbsolutePercentageError(), y, p) == pytest.approx(100 * skm.mean_absolute_percentage_error(y, p))
    q = np.abs(p)
    assert _batched(metrics.MeanSquaredLogarithmicError(), y, q) == pytest.approx(skm.mean_squared_log_error(y, q), rel=1e-12)
    # negative predictions are clipped at 1e-7 before the log (Keras)
    neg = metrics.MeanSquaredLogarithmicError()
    neg.update_state([[1.0]], [[-5.0]])
    assert neg.result() == pytest.approx((np.log(1 + EPS) - np.log(2.0)) ** 2)


# -------------------------------------------------------------- classification
def test_f1_score_averages_match_sklearn():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), 60)
    labels = rng.integers(0, 4, 60)
    onehot = np.eye(4)[labels]
    predicted = probs.argmax(axis=1)  # threshold=None: each row's maximum is its positive
    for average in (None, "micro", "macro", "weighted"):
        got = _batched(metrics.F1Score(average=average), onehot, probs)
        np.testing.assert_allclose(got, skm.f1_score(labels, predicted, average=average), atol=1e-5)
    beta = _batched(metrics.FBetaScore(average="macro", beta=2.0), onehot, probs)
    assert beta == pytest.approx(skm.fbeta_score(labels, predicted, beta=2.0, average="macro"), abs=1e-5)
    # a threshold makes each output its own binary decision
    multi = (rng.uniform(size=(60, 3)) < 0.5).astype(float)
    scores = rng.uniform(size=(60, 3))
    got = _batched(metrics.F1Score(average="macro", threshold=0.6), multi, scores)
    assert got == pytest.approx(skm.f1_score(multi, scores > 0.6, average="macro"), abs=1e-5)


def test_top_k_accuracy():
    rng = np.random.default_rng(6)
    scores = rng.uniform(size=(50, 8))
    labels = rng.integers(0, 8, 50)
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(8))
        assert _batched(metrics.SparseTopKCategoricalAccuracy(k=k), labels, scores) == pytest.approx(expected)
        assert _batched(metrics.TopKCategoricalAccuracy(k=k), np.eye(8)[labels], scores) == pytest.approx(expected)
    assert metrics.TopKCategoricalAccuracy().k == 5
    tie = metrics.TopKCategoricalAccuracy(k=1)
    tie.update_state([[0, 1, 0]], [[0.4, 0.4, 0.2]])  # in_top_k: a tie with the k-th score counts
    assert tie.result() == 1.0


def test_cross_entropy_metrics():
    rng = np.random.default_rng(7)
    p = rng.uniform(0.05, 0.95, (30, 1))
    y = (rng.uniform(size=30) < 0.5).astype(float)
    assert _batched(metrics.BinaryCrossentropy(), y, p) == pytest.approx(skm.log_loss(y, p[:, 0]), rel=1e-9)
    z = np.log(p / (1 - p))
    assert _batched(metrics.BinaryCrossentropy(from_logits=True), y, z) == pytest.approx(skm.log_loss(y, p[:, 0]), rel=1e-9)
    smoothed = y * 0.8 + 0.1
    bce = -(smoothed * np.log(p[:, 0]) + (1 - smoothed) * np.log(1 - p[:, 0])).mean()
    assert _batched(metrics.BinaryCrossentropy(label_smoothing=0.2), y, p) == pytest.approx(bce, rel=1e-9)

    logits = rng.normal(size=(30, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 4, 30)
    expected = skm.log_loss(labels, probs, labels=np.arange(4))
    assert _batched(metrics.CategoricalCrossentropy(), np.eye(4)[labels], probs) == pytest.approx(expected, rel=1e-9)
    assert _batched(metrics.CategoricalCrossentropy(from_logits=True), np.eye(4)[labels], logits) == pytest.approx(expected, rel=1e-9)
    assert _batched(metrics.SparseCategoricalCrossentropy(), labels, probs) == pytest.approx(expected, rel=1e-9)
    assert _batched(metrics.SparseCategoricalCrossentropy(from_logits=True), labels, logits) == pytest.approx(expected, rel=1e-9)
    smooth = np.eye(4)[labels] * 0.9 + 0.1 / 4
    cce = -(smooth * np.log(probs)).sum(axis=1).mean()
    assert _batched(metrics.CategoricalCrossentropy(label_smoothing=0.1), np.eye(4)[labels], probs) == pytest.approx(cce, rel=1e-9)


def test_precision_recall_thresholds_top_k_class_id():
    rng = np.random.default_rng(8)
    scores = rng.uniform(size=(40, 3))
    labels = (rng.uniform(size=(40, 3)) < 0.5).astype(float)
    w = rng.uniform(0.2, 1.5, 40)
    ww = np.repeat(w, 3)
    got_p = _batched(metrics.Precision(thresholds=[0.3, 0.7]), labels, scores, w)
    got_r = _batched(metrics.Recall(thresholds=[0.3, 0.7]), labels, scores, w)
    for i, t in enumerate((0.3, 0.7)):
        pred = (scores > t).ravel()
        assert got_p[i] == pytest.approx(skm.precision_score(labels.ravel(), pred, sample_weight=ww))
        assert got_r[i] == pytest.approx(skm.recall_score(labels.ravel(), pred, sample_weight=ww))
    assert _batched(metrics.Precision(thresholds=0.4), labels, scores) == pytest.approx(
        skm.precision_score(labels.ravel(), (scores > 0.4).ravel())
    )
    assert _batched(metrics.Recall(class_id=1), labels, scores) == pytest.approx(skm.recall_score(labels[:, 1], scores[:, 1] > 0.5))
    top1 = scores == scores.max(axis=1, keepdims=True)  # top_k without thresholds: the top k are the positives
    assert _batched(metrics.Precision(top_k=1), labels, scores) == pytest.approx(skm.precision_score(labels.ravel(), top1.ravel()))


def test_user_functions_and_mean():
    rng = np.random.default_rng(9)
    y, p = rng.normal(size=(20, 2)), rng.normal(size=(20, 2))
    w = rng.uniform(0.5, 1.5, 20)

    def abs_error(y_true, y_pred):
        return np.abs(y_true - y_pred)  # (M, 2): averaged over the outputs, then over samples

    got = _batched(metrics.MeanMetricWrapper(abs_error), y, p, w, batch=6)
    assert got == pytest.approx(np.average(np.abs(y - p).mean(axis=1), weights=w))
    # a scalar per batch counts once per batch (Keras's Mean of a scalar)
    batch_means = [np.abs(y[s : s + 6] - p[s : s + 6]).mean() for s in range(0, 20, 6)]
    assert _batched(metrics.MeanMetricWrapper(lambda a, b: np.abs(a - b).mean()), y, p, batch=6) == pytest.approx(np.mean(batch_means))

    mean = metrics.Mean()
    mean.update_state([1.0, 2.0, 3.0])
    mean.update_state([[4.0, 6.0]], sample_weight=[2.0])  # one sample of value 5, weight 2
    assert mean.result() == pytest.approx((1 + 2 + 3 + 5 * 2) / 5)
    mean.reset_state()
    assert mean.result() == 0.0
    total = metrics.Sum()
    total.update_state([1.0, 3.0, 5.0, 7.0])
    total.update_state([2.0], sample_weight=[0.5])
    assert total.result() == 17.0
    nan_auc = metrics.AUC(num_thresholds=3)  # a NaN score counts as the lowest score, 0
    nan_auc.update_state([0, 0, 1, 1], [np.nan, 0.5, 0.3, 0.9])
    assert nan_auc.result() == 0.75


def test_function_forms():
    rng = np.random.default_rng(10)
    y, p = rng.uniform(0.5, 2, (6, 3)), rng.uniform(0.5, 2, (6, 3))
    np.testing.assert_allclose(metrics.mse(y, p), ((y - p) ** 2).mean(axis=1))
    np.testing.assert_allclose(metrics.mae(y, p), np.abs(y - p).mean(axis=1))
    np.testing.assert_allclose(metrics.mape(y, p), 100 * (np.abs(y - p) / y).mean(axis=1))
    np.testing.assert_allclose(metrics.msle(y, p), ((np.log1p(y) - np.log1p(p)) ** 2).mean(axis=1))
    np.testing.assert_array_equal(metrics.sparse_top_k_categorical_accuracy([2, 0], [[0.1, 0.2, 0.7], [0.1, 0.5, 0.4]]), [1, 1])
    model = gpunn.Sequential([Dense(3, input_dim=2)])
    model.compile(loss="mse", metrics=[metrics.mae, metrics.mean_squared_error])
    # in compile a function form is the built-in metric, logged and saved under the function's name
    assert model.metrics_names == ["loss", "mean_absolute_error", "mean_squared_error"]
    assert model.get_compile_config()["metrics"] == ["mean_absolute_error", "mean_squared_error"]


def test_bad_arguments_name_themselves():
    for make, word in (
        (lambda: metrics.AUC(curve="roc_curve"), "curve"),
        (lambda: metrics.AUC(summation_method="simpson"), "summation_method"),
        (lambda: metrics.F1Score(average="samples"), "average"),
        (lambda: metrics.F1Score(threshold=1.5), "threshold"),
        (lambda: metrics.Precision(thresholds=[0.5, 2.0]), "thresholds"),
        (lambda: metrics.R2Score(class_aggregation="median"), "class_aggregation"),
        (lambda: metrics.TopKCategoricalAccuracy(k=0), "k"),
    ):
        with pytest.raises((ValueError, TypeError), match=word):
            make()
    model = gpunn.Sequential([Dense(2, input_dim=3)])
    with pytest.raises(TypeError, match="Mean"):
        model.compile(loss="mse", metrics=[metrics.Mean()])
    with pytest.raises(ValueError, match="'aucc'"):
        model.compile(loss="mse", metrics=["aucc"])


# ------------------------------------------------------------------ inside fit
def _classifier(seed=0):
    gpunn.set_seed(seed)
    model = gpunn.Sequential([Dense(6, activation="tanh", input_dim=4), Dense(3, activation="softmax")])
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=[
            "auc",
            metrics.AUC(curve="PR", multi_label=True),
            metrics.F1Score(average="macro"),
            "sparse_top_k_categorical_accuracy",
            metrics.SparseTopKCategoricalAccuracy(k=2),
            "sparse_categorical_crossentropy",
            metrics.Precision(thresholds=0.4),
            lambda y_true, y_pred: y_pred.max(axis=1),
        ],
        weighted_metrics=["auc"],
    )
    return model


def _data(n=23):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 4))
    return x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)


def _expected(x, y, probs, w=None):
    """Every metric of _classifier computed by the standalone metrics on the model's predictions."""
    out = {}
    onehot = np.eye(3)[y]
    for key, metric, target in (
        ("auc", metrics.AUC(), onehot),
        ("auc_1", metrics.AUC(curve="PR", multi_label=True), onehot),
        ("f1_score", metrics.F1Score(average="macro"), onehot),
        ("sparse_top_k_categorical_accuracy", metrics.SparseTopKCategoricalAccuracy(), y),
        ("sparse_top_k_categorical_accuracy_1", metrics.SparseTopKCategoricalAccuracy(k=2), y),
        ("sparse_categorical_crossentropy", metrics.SparseCategoricalCrossentropy(), y),
        ("precision", metrics.Precision(thresholds=0.4), onehot),
    ):
        metric.update_state(target, probs)
        out[key] = metric.result()
    out["<lambda>"] = probs.max(axis=1).mean()
    weighted = metrics.AUC()
    weighted.update_state(onehot, probs, sample_weight=w)
    out["weighted_auc"] = weighted.result()
    return out


def test_metrics_in_evaluate_use_keras_names_and_values():
    x, y = _data()
    model = _classifier()
    model.fit(x, y, epochs=2, batch_size=5, verbose=0)
    logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    expected = _expected(x, y, model.predict(x, verbose=0))
    assert list(logs) == ["loss", *expected]
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    history = model.fit(x, y, epochs=1, batch_size=5, verbose=0, validation_split=0.3)
    assert set(history.history) == set(logs) | {"val_" + k for k in logs}


def test_metric_configs_round_trip_through_save(tmp_path):
    x, y = _data()
    model = _classifier()
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=[metrics.AUC(num_thresholds=50, curve="PR", from_logits=False), metrics.F1Score("weighted", threshold=0.3),
                 metrics.R2Score(), "top_k_categorical_accuracy", metrics.Precision(thresholds=[0.2, 0.6], class_id=2)],  # fmt: skip
    )
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "m.gpunn")
    loaded = gpunn.load_model(tmp_path / "m.gpunn")
    assert loaded.get_compile_config() == model.get_compile_config()
    a, b = model.evaluate(x, y, verbose=0, return_dict=True), loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_user_function_metric_saves_by_name_and_loads_uncompiled(tmp_path):
    x, y = _data()
    model = _classifier()
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.gpunn")
    with pytest.raises(gpunn.ModelFileError, match="compile=False"):
        gpunn.load_model(tmp_path / "m.gpunn")
    np.testing.assert_array_equal(gpunn.load_model(tmp_path / "m.gpunn", compile=False).predict(x, verbose=0), model.predict(x, verbose=0))


def test_metric_states_are_read_once_per_epoch(monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(gpunn.models.backends, "current", lambda: backend)
    x, y = _data(80)

    def reads(n):
        model = _classifier()
        model.build()
        before = backend.reads
        model.fit(x[:n], y[:n], batch_size=4, epochs=1, verbose=0)
        return backend.reads - before

    assert reads(8) == reads(80)  # 2 batches or 20: the same reads


_CUDA = cuda_status()


@pytest.mark.simulator
@pytest.mark.skipif(not _CUDA.usable, reason=f"the CUDA backend cannot run here: {_CUDA.reason}")
def test_metrics_on_the_cuda_backend():
    x, y = _data(9)
    with gpunn.use_backend("cuda"):
        model = _classifier()
        model.build()
        assert model.backend.name == "cuda"
        w = np.linspace(0.5, 1.5, 9)
        logs = model.evaluate(x, y, batch_size=5, sample_weight=w, verbose=0, return_dict=True)
        probs = model.predict(x, verbose=0)
    expected = _expected(x, y, probs.astype(np.float64), w)
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_auc_and_f1_track_a_real_classifier():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    gpunn.set_seed(0)
    model = gpunn.Sequential([Dense(16, activation="relu", input_dim=30), Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy",
                  metrics=["accuracy", metrics.AUC(), metrics.AUC(curve="PR", name="pr_auc"), metrics.F1Score(threshold=0.5)])  # fmt: skip
    history = model.fit(x, y, epochs=8, batch_size=32, validation_split=0.2, shuffle=True, verbose=0)
    assert {"auc", "pr_auc", "f1_score", "val_auc", "val_pr_auc", "val_f1_score"} <= set(history.history)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    p = model.predict(x, verbose=0)[:, 0]
    assert logs["auc"] > 0.97
    # 200 thresholds quantise the curve: within a few thousandths of the exact area
    assert logs["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=5e-3)
    assert logs["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=2e-2)
    assert logs["f1_score"][0] == pytest.approx(skm.f1_score(y, p > 0.5), abs=1e-5)
