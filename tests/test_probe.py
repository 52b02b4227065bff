"""LogisticProbe and StandardScaler against scikit-learn on the same standardised features."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler as SkScaler

from clip_us.evaluation.probe import LogisticProbe, StandardScaler, select_C

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: threads only add overhead


def make_data(n_classes: int, seed: int = 0):
    """Imbalanced classes (60/25/15 %), badly scaled columns (1e-3 .. 1e3) and a constant one."""
    rng = np.random.default_rng(seed)
    sizes = {2: [70, 25], 3: [60, 25, 15]}[n_classes]
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    centres = rng.normal(size=(n_classes, 12))
    X = centres[y] * 0.8 + rng.normal(size=(len(y), 12))
    X *= np.logspace(-3, 3, 12)  # badly scaled columns
    X[:, 5] = 7.0  # constant: the scaler must keep scale 1, not divide by 0
    return X, y


def test_scaler_matches_sklearn():
    X, _ = make_data(3)
    ours, ref = StandardScaler().fit(X), SkScaler().fit(X)
    np.testing.assert_allclose(ours.transform(X).numpy(), ref.transform(X), atol=1e-12)
    np.testing.assert_allclose(ours.scale_.numpy(), ref.scale_, rtol=1e-12)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("C", [0.01, 1.0, 10.0])
def test_probe_matches_sklearn(n_classes, C):
    X, y = make_data(n_classes, seed=n_classes)
    Xs = SkScaler().fit_transform(X)
    # scikit-learn stops at tol=1e-4 on its own scaled objective by default; a tighter tol makes it
    # the exact reference (the minimiser is unique, so both must land on it).
    ref = LogisticRegression(solver="lbfgs", class_weight="balanced", C=C, max_iter=3000,
                             tol=1e-10).fit(Xs, y)
    ours = LogisticProbe(C=C, class_weight="balanced", max_iter=3000).fit(Xs, y)
    assert ours.coef_.shape == ref.coef_.shape  # binary: one weight vector, multinomial: K
    np.testing.assert_allclose(ours.predict_proba(Xs), ref.predict_proba(Xs), atol=1e-3)
    np.testing.assert_array_equal(ours.predict(Xs), ref.predict(Xs))
    Xt, _ = make_data(n_classes, seed=10 + n_classes)  # unseen rows too
    Xt = SkScaler().fit(X).transform(Xt)
    np.testing.assert_allclose(ours.predict_proba(Xt), ref.predict_proba(Xt), atol=1e-3)
    np.testing.assert_array_equal(ours.predict(Xt), ref.predict(Xt))


def test_probe_default_sklearn_tolerance_agrees_too():
    X, y = make_data(3, seed=5)
    Xs = SkScaler().fit_transform(X)
    ref = LogisticRegression(solver="lbfgs", class_weight="balanced", C=1.0, max_iter=3000).fit(Xs, y)
    ours = LogisticProbe(C=1.0).fit(Xs, y)
    np.testing.assert_allclose(ours.predict_proba(Xs), ref.predict_proba(Xs), atol=1e-3)


def test_string_labels_and_bad_input():
    X, y = make_data(2)
    names = np.array(["benign", "malignant"])[y]
    probe = LogisticProbe().fit(StandardScaler().fit_transform(X), names)
    assert set(probe.predict(StandardScaler().fit_transform(X))) <= {"benign", "malignant"}
    with pytest.raises(ValueError, match="two classes"):
        LogisticProbe().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="C must be positive"):
        LogisticProbe(C=0)
    with pytest.raises(ValueError, match="finite"):
        LogisticProbe().fit(np.full((4, 2), np.nan), [0, 1, 0, 1])
    with pytest.warns(UserWarning, match="before converging"):  # as scikit-learn's ConvergenceWarning
        LogisticProbe(max_iter=2).fit(StandardScaler().fit_transform(X), y)


def test_select_C_picks_best_validation_weighted_f1():
    X, y = make_data(3, seed=7)
    scaler = StandardScaler().fit(X[::2])
    Xtr, Xva = scaler.transform(X[::2]), scaler.transform(X[1::2])
    probe, C, scores = select_C(Xtr, y[::2], Xva, y[1::2])
    assert set(scores) == {0.01, 0.1, 1.0, 10.0}
    assert scores[C] == max(scores.values()) and probe.C == C
    first_best = next(c for c in scores if scores[c] == max(scores.values()))
    assert C == first_best
    for c, s in scores.items():
        ref = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, tol=1e-10).fit(Xtr.numpy(), y[::2])
        assert s == pytest.approx(f1_score(y[1::2], ref.predict(Xva.numpy()), average="weighted"))
