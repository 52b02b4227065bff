"""EchoCare-CLIP evaluation metrics: ranked retrieval, weighted F1, multi-class AUROC, few-shot
sampling. References: a direct argsort loop (the authors' definition) and scikit-learn."""
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from clip_us import metrics


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def argsort_recall(sim, ks=(1, 5, 10)):
    """A direct loop: row i's rank is where i lands in a stable argsort(-sim[i])."""
    ranks = np.array([int(np.where(np.argsort(-row, kind="stable") == i)[0][0]) for i, row in enumerate(sim)])
    return {k: float(np.mean(ranks < k)) for k in ks}, float(np.mean(ranks) + 1)


def authors_recall(img, txt, ks=(1, 5, 10)):
    """The authors' definition (echocare-clip-exp-organized-Apr25.ipynb), written out: float32
    embeddings, sim = img @ txt.T, np.argsort(-sim, axis=1) with numpy's default kind, a hit when
    i is among the first K of row i; text-to-image ranks sim.T the same way."""
    img, txt = np.asarray(img, dtype=np.float32), np.asarray(txt, dtype=np.float32)
    sim = img @ txt.T
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        order = np.argsort(-s, axis=1)
        for k in ks:
            out[f"{direction}_R@{k}"] = float(np.mean(np.any(order[:, :k] == np.arange(len(s))[:, None], axis=1)))
    return out


def template_pairs(n=117, distinct=30, seed=0):
    """n image-caption pairs whose captions come from `distinct` texts (as template captions
    do): identical captions have identical float32 embeddings, images are near their caption."""
    rng = np.random.default_rng(seed)
    texts = unit(rng.normal(size=(distinct, 32))).astype(np.float32)
    which = rng.integers(0, distinct, size=n)
    txt = texts[which]
    img = unit(txt + 0.8 * rng.normal(size=txt.shape)).astype(np.float32)
    return img, txt, [f"caption {w}" for w in which]


def test_strict_retrieval_is_the_authors_ranking_on_repeated_captions():
    img, txt, captions = template_pairs()
    assert len(set(captions)) <= 30 and len(captions) == 117
    got = metrics.retrieval_ranked(img, txt)
    want = authors_recall(img, txt)
    assert {k: got[k] for k in want} == want  # exactly, not approximately
    stable = metrics.retrieval_ranked(img, txt, stable=True)
    assert any(stable[k] != want[k] for k in want)  # the tie rule matters here: ours differs
    for direction, s in (("i2t", img.astype(np.float64) @ txt.T), ("t2i", txt.astype(np.float64) @ img.T)):
        recall, _ = argsort_recall(s)
        assert all(stable[f"{direction}_R@{k}"] == pytest.approx(v) for k, v in recall.items())
    strict = metrics.strict_retrieval(img, txt)
    assert all(strict[f"strict_{k}"] == v for k, v in want.items())
    assert metrics.strict_retrieval(img, txt, stable=True)["strict_i2t_R@5"] == stable["i2t_R@5"]


def test_authors_ranking_is_one_matrix_on_1500_pairs_with_ties():
    """Past the 1024-row blocks the authors' tie order still comes from their one img @ txt.T:
    a block's products round differently in the last bit, and numpy's unstable sort reorders
    ties on them (on these pairs the blocked ranking missed the authors' R@K)."""
    img, txt, captions = template_pairs(n=1500, distinct=40, seed=1)
    want = authors_recall(img, txt)
    for chunk in (1024, 64):  # chunk sizes memory for the stable order only
        got = metrics.retrieval_ranked(img, txt, chunk=chunk)
        assert {k: got[k] for k in want} == want


def tied_pairs():
    """12 pairs; images 0-3 identical and texts 4-7 identical, so many similarities tie."""
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(12, 8)), rng.normal(size=(12, 8))
    img[1:4] = img[0]
    txt[5:8] = txt[4]
    txt[:3] = img[:3] + 0.3 * txt[:3]
    return unit(img), unit(txt)


def test_stable_retrieval_equals_argsort_definition_with_ties():
    img, txt = tied_pairs()
    sim = img @ txt.T
    assert len(np.unique(np.round(sim, 12))) < sim.size  # the case really has ties
    got = metrics.retrieval_ranked(img, txt, stable=True)
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        recall, mean_rank = argsort_recall(s)
        for k, v in recall.items():
            assert got[f"{direction}_R@{k}"] == pytest.approx(v)
        assert got[f"{direction}_mean_rank"] == pytest.approx(mean_rank)


def test_stable_ties_fall_in_position_order():
    img = unit(np.ones((40, 3)))  # collapsed: every similarity ties
    got = metrics.retrieval_ranked(img, img, ks=(1, 2), stable=True)
    assert got["i2t_R@1"] == 1 / 40 and got["i2t_R@2"] == 2 / 40  # row i sits at position i
    assert got["i2t_mean_rank"] == 20.5


def test_duplicate_aware_at_least_strict_and_counts_identical_captions():
    img, txt = tied_pairs()
    captions = ["a", "b", "a", "c", "d", "d", "d", "d", "e", "b", "f", "a"]
    strict = metrics.retrieval_ranked(img, txt, stable=True)
    dup = metrics.retrieval_ranked(img, txt, captions=captions, stable=True)
    assert all(dup[k] >= strict[k] for k in strict if "R@" in k)
    assert all(dup[k] <= strict[k] for k in strict if "mean_rank" in k)
    assert dup["t2i_R@1"] > strict["t2i_R@1"]  # identical texts 4-7 now all count
    # direct definition: the first column with the same caption in the stable order
    sim = img @ txt.T
    ranks = [next(p for p, j in enumerate(np.argsort(-sim[i], kind="stable")) if captions[j] == captions[i])
             for i in range(12)]
    assert dup["i2t_R@1"] == pytest.approx(np.mean(np.array(ranks) < 1))
    with pytest.raises(ValueError, match="captions"):
        metrics.retrieval_ranked(img, txt, captions=["a"] * 3)


def test_weighted_f1_and_auroc_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, 3, size=60))
    pred[pred == 2] = 0  # a class never predicted: F1 0 for it, as scikit-learn
    assert metrics.weighted_f1(pred, y) == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))
    logits = rng.integers(0, 4, size=(60, 3)).astype(float)  # few distinct values: ties
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metrics.multiclass_auroc(probs, y) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    p2 = rng.dirichlet(np.ones(2), size=60)
    y2 = rng.integers(0, 2, size=60)
    assert metrics.multiclass_auroc(p2, y2) == pytest.approx(roc_auc_score(y2, p2[:, 1]))
    with pytest.raises(ValueError, match="one class"):
        metrics.multiclass_auroc(probs, np.zeros(60, int))


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1])
def test_fewshot_per_class_counts(fraction):
    y = np.array([0] * 500 + [1] * 130 + [2] * 7)
    idx = metrics.fewshot_indices(y, fraction, seed=42)
    counts = np.bincount(y[idx], minlength=3)
    expected = [min(n, max(2, math.ceil(fraction * n))) for n in (500, 130, 7)]
    assert counts.tolist() == expected
    assert len(np.unique(idx)) == len(idx)  # without replacement
    assert np.array_equal(idx, metrics.fewshot_indices(y, fraction, seed=42))
    assert not np.array_equal(idx, metrics.fewshot_indices(y, fraction, seed=43))


def test_fewshot_exact_fraction_and_bad_fraction():
    y = np.array([0] * 100 + [1] * 200)
    assert np.bincount(y[metrics.fewshot_indices(y, 0.05, seed=0)]).tolist() == [5, 10]  # ceil(5.0) = 5
    with pytest.raises(ValueError, match="fraction"):
        metrics.fewshot_indices(y, 0, seed=0)


def test_strict_and_dup_keys_are_retrieval_ranked_prefixed():
    img, txt = tied_pairs()
    captions = ["a", "b", "a", "c", "d", "d", "d", "d", "e", "b", "f", "a"]
    assert metrics.strict_retrieval(img, txt) == \
        {f"strict_{k}": v for k, v in metrics.retrieval_ranked(img, txt).items()}
    assert metrics.dup_retrieval(img, txt, captions) == \
        {f"dup_{k}": v for k, v in metrics.retrieval_ranked(img, txt, captions=captions).items()}
