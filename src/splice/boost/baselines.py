"""What a tabular user compares a language model with first: logistic regression and gradient-
boosted trees (scikit-learn's HistGradientBoostingClassifier, XGBoost), fitted on the same shots
and scored on the same rows as BoostLLM (`splice.boost.tabular_llm.scores`).

Defaults as their libraries ship them (the user's first try), with two few-shot necessities:
logistic regression on standardised features, and trees allowed leaves of one row (their default
minimum of 20 rows a leaf makes 16 shots a single leaf). XGBoost is an optional dependency
(`splice[tabular]`); without it its row says so instead of a score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from splice.boost.tabular import Split, Table
from splice.boost.tabular_llm import scores

BASELINES = ("logistic_regression", "hist_gradient_boosting", "xgboost")


def fit_baselines(table: Table, split: Split, test: list[int], seed: int,
                  names: tuple[str, ...] = BASELINES) -> dict[str, dict[str, Any]]:
    """Each baseline fitted on the shots (training and validation rows: trees and logistic
    regression need no held-out rows) and scored on `test`: its scores, or why it did not run."""
    features, labels = table.features(), np.asarray(table.labels)
    shots = np.concatenate([split.train, split.validation])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            model = MAKERS[name](seed, len(table.classes))
        except ImportError as err:
            out[name] = {"error": f"not installed ({err.name}); pip install 'splice[tabular]'"}
            continue
        seen = np.unique(labels[shots])  # XGBoost wants classes 0..k-1: the shots may miss one
        model.fit(features[shots], np.searchsorted(seen, labels[shots]))
        probabilities = _all_classes(model.predict_proba(features[test]), seen[model.classes_], len(table.classes))
        out[name] = scores(probabilities, labels[test])
    return out


def _logistic(seed: int, classes: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def _hist_gradient_boosting(seed: int, classes: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(min_samples_leaf=1, random_state=seed)


def _xgboost(seed: int, classes: int) -> Any:
    from xgboost import XGBClassifier

    return XGBClassifier(random_state=seed, n_jobs=1)


MAKERS: dict[str, Callable[[int, int], Any]] = {
    "logistic_regression": _logistic, "hist_gradient_boosting": _hist_gradient_boosting, "xgboost": _xgboost}


def _all_classes(probabilities: np.ndarray, seen: np.ndarray, classes: int) -> np.ndarray:
    """Probabilities over every class of the table (a model fitted on shots that miss a class
    gives it probability 0)."""
    full = np.zeros((len(probabilities), classes))
    full[:, np.asarray(seen, dtype=int)] = probabilities
    return full
