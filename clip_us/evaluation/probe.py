"""Linear probe on frozen embeddings: a standard scaler and logistic regression, in torch.

EchoCare-CLIP ("linear probing") fits scikit-learn's ``StandardScaler`` and
``LogisticRegression(solver="lbfgs", class_weight="balanced", max_iter=3000)``, with C picked from
{0.01, 0.1, 1, 10} by validation weighted F1. This file rebuilds both without scikit-learn:

- ``StandardScaler``: (x - mean) / std with the population std (ddof=0); a constant column keeps
  scale 1, as scikit-learn does.
- ``LogisticProbe`` minimises scikit-learn's objective

      C · Σ_i w_i · logloss_i + ½ ‖W‖²        (intercept not penalised)

  with w_i = n / (n_classes · count(y_i)) for ``class_weight="balanced"``. Two classes: one weight
  vector and a sigmoid (scikit-learn's binary case). More: multinomial softmax with the penalty over
  every class's weights. Solved with torch's L-BFGS (strong Wolfe line search) in float64, with
  tight tolerances, so probabilities agree with scikit-learn's to ~1e-4.
- ``select_C``: fit one probe per C on the training rows, keep the best validation weighted F1
  (the first C wins a tie, as a strict ``>`` comparison over the list does).

Imports only torch, numpy and the portable ``metrics.py`` (for weighted F1).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..metrics import weighted_f1

PROBE_CS = (0.01, 0.1, 1.0, 10.0)


def _as_float64(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x),
                        dtype=torch.float64)
    if x.ndim != 2 or not torch.isfinite(x).all():
        raise ValueError(f"probe: features must be a finite [N, D] array, got shape {tuple(x.shape)}")
    return x


class StandardScaler:
    """scikit-learn's StandardScaler: per column (x - mean) / std, population std, 1 where std is 0."""

    def fit(self, X):
        X = _as_float64(X)
        self.mean_ = X.mean(0)
        std = X.std(0, unbiased=False)
        self.scale_ = torch.where(std > 0, std, torch.ones_like(std))
        return self

    def transform(self, X) -> torch.Tensor:
        return (_as_float64(X) - self.mean_) / self.scale_

    def fit_transform(self, X) -> torch.Tensor:
        return self.fit(X).transform(X)


def balanced_weights(codes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """scikit-learn's class_weight="balanced" per sample: n / (n_classes · count of its class)."""
    counts = torch.bincount(codes, minlength=n_classes).double()
    return (len(codes) / (n_classes * counts))[codes]


class LogisticProbe:
    """Logistic regression with scikit-learn's L2 objective, fitted by L-BFGS in float64.

    ``fit(X, y)`` takes any labels (ints or strings); ``classes_`` holds them sorted, and
    ``predict`` returns them. ``coef_`` is [1, D] for two classes and [K, D] above.
    """

    def __init__(self, C: float = 1.0, class_weight: str | None = "balanced", max_iter: int = 3000,
                 tol: float = 1e-10):
        if C <= 0:
            raise ValueError(f"LogisticProbe: C must be positive, got {C}")
        if class_weight not in ("balanced", None):
            raise ValueError(f"LogisticProbe: class_weight must be 'balanced' or None, got {class_weight!r}")
        self.C, self.class_weight, self.max_iter, self.tol = C, class_weight, max_iter, tol

    def _logits(self, X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return X @ W.T + b  # [N, D] @ [D, K'] -> [N, K'], K' = 1 for the binary sigmoid

    def _loss(self, X, codes, sw, W, b) -> torch.Tensor:
        """scikit-learn's objective divided by Σ w_i (same minimiser, gradients of order 1)."""
        z = self._logits(X, W, b)
        if W.shape[0] == 1:  # binary: log(1 + exp(-s·z)) with s = ±1
            nll = torch.nn.functional.softplus(-(2.0 * codes - 1.0) * z[:, 0])
        else:
            nll = torch.nn.functional.cross_entropy(z, codes, reduction="none")
        total = sw.sum()
        return (sw * nll).sum() / total + 0.5 * (W * W).sum() / (self.C * total)

    def fit(self, X, y):
        X = _as_float64(X)
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"LogisticProbe: need at least two classes, got {list(self.classes_)}")
        if len(codes) != len(X):
            raise ValueError(f"LogisticProbe: {len(X)} feature rows but {len(codes)} labels")
        codes = torch.as_tensor(codes.reshape(-1), dtype=torch.long)
        k = len(self.classes_)
        sw = balanced_weights(codes, k) if self.class_weight else torch.ones(len(codes), dtype=torch.float64)
        rows = 1 if k == 2 else k
        W = torch.zeros(rows, X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(rows, dtype=torch.float64, requires_grad=True)
        self.n_iter_ = self._minimise(lambda: self._loss(X, codes, sw, W, b), [W, b])
        self.coef_, self.intercept_ = W.detach(), b.detach()
        return self

    def _minimise(self, loss_fn, params) -> int:
        opt = torch.optim.LBFGS(params, lr=1, max_iter=self.max_iter, max_eval=2 * self.max_iter,
                                tolerance_grad=self.tol, tolerance_change=1e-15, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
        state = opt.state[opt._params[0]]
        if state["n_iter"] >= self.max_iter or state["func_evals"] >= 2 * self.max_iter:
            # as scikit-learn's ConvergenceWarning: the fit is used, but the user is told
            warnings.warn(f"LogisticProbe (C={self.C}): L-BFGS stopped at max_iter={self.max_iter} "
                          f"before converging; the probabilities may be off by more than 1e-3")
        return int(state["n_iter"])

    def decision_function(self, X) -> torch.Tensor:
        z = self._logits(_as_float64(X), self.coef_, self.intercept_)
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X) -> np.ndarray:
        """[N, K] class probabilities in ``classes_`` order."""
        z = self.decision_function(X)
        if z.ndim == 1:
            p = torch.sigmoid(z)
            return torch.stack([1 - p, p], dim=1).numpy()
        return torch.softmax(z, dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


def select_C(X_train, y_train, X_val, y_val, Cs=PROBE_CS, bar=None,
             **kw) -> tuple[LogisticProbe, float, dict]:
    """Fit a probe per C on the (already scaled) training rows; the best validation weighted F1
    wins, the first C on a tie. Returns (probe, C, {C: validation F1}). ``bar`` (a tqdm bar)
    advances once per fit."""
    best, scores = None, {}
    for C in Cs:
        probe = LogisticProbe(C=C, **kw).fit(X_train, y_train)
        scores[C] = weighted_f1(probe.predict(X_val), y_val)
        if bar is not None:
            bar.update(1)
        if best is None or scores[C] > scores[best[1]]:
            best = (probe, C)
    return best[0], best[1], scores
