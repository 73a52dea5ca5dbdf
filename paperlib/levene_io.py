"""Reading features for the Levene command line: a CSV (a label column + feature columns) or an ``.npz``.

``python -m paperlib levene FILE`` runs :func:`paperlib.levene.levene_features` on the file; every bad input
raises :class:`FeatureFileError` with the problem and the fix, which the command prints before exiting 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class FeatureFileError(ValueError):
    """The feature file cannot be used as it is."""


def _check(features: np.ndarray, labels: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if features.ndim == 1:
        features = features[:, None]
    if features.ndim != 2 or features.shape[1] == 0:
        raise FeatureFileError(f"{path}: features must be [N, D] with D >= 1, got shape {features.shape}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise FeatureFileError(f"{path}: need one label per feature row ({len(features)}), got shape {labels.shape}")
    bad = ~np.isfinite(features)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise FeatureFileError(f"{path}: {len(rows)} row(s) hold NaN or inf features (first: {rows[:5].tolist()}); "
                               "drop or impute them")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise FeatureFileError(f"{path}: Levene's test needs at least 2 classes, found {classes.tolist()}")
    small = classes[counts < 2]
    if len(small):
        raise FeatureFileError(f"{path}: class(es) {small.tolist()} have fewer than 2 samples; "
                               "drop them or collect more samples")
    return features, labels


def read_feature_file(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] float64, labels [N] int64)`` from a CSV or an ``.npz`` (keys ``features``, ``labels``)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such file; pass a CSV or an .npz with 'features' and 'labels'")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("features", "labels") if k not in npz.files]
            if missing:
                raise FeatureFileError(f"{path}: missing array(s) {missing}; the .npz holds {npz.files}. "
                                       "Save with np.savez(path, features=F, labels=y)")
            features, labels = npz["features"], npz["labels"]
        if not np.issubdtype(features.dtype, np.number):
            raise FeatureFileError(f"{path}: 'features' has dtype {features.dtype}; it must be numeric")
        if not np.issubdtype(labels.dtype, np.integer):
            raise FeatureFileError(f"{path}: 'labels' has dtype {labels.dtype}; use integer class ids")
        return _check(features.astype(np.float64), labels.astype(np.int64), path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise FeatureFileError(f"{path}: not a readable CSV ({e}); expect a header with '{label_column}' "
                               "and feature columns") from None
    if label_column not in df.columns:
        raise FeatureFileError(f"{path}: no '{label_column}' column (columns: {list(df.columns)}); "
                               "name the label column with --label-column")
    feature_cols = [c for c in df.columns if c != label_column]
    if not feature_cols:
        raise FeatureFileError(f"{path}: no feature columns besides '{label_column}'")
    if df[label_column].isna().any():
        raise FeatureFileError(f"{path}: missing labels in rows {df.index[df[label_column].isna()][:5].tolist()}")
    labels = pd.to_numeric(df[label_column], errors="coerce")
    if labels.isna().any() or (labels != labels.round()).any():
        rows = df.index[labels.isna() | (labels != labels.round())][:5].tolist()
        raise FeatureFileError(f"{path}: labels must be integers; bad rows (0-based) {rows}")
    numeric = df[feature_cols].apply(pd.to_numeric, errors="coerce")
    non_numeric = numeric.isna() & df[feature_cols].notna()
    if non_numeric.any().any():
        cols = [c for c in feature_cols if non_numeric[c].any()]
        raise FeatureFileError(f"{path}: non-numeric values in column(s) {cols}; features must be numbers")
    return _check(numeric.to_numpy(np.float64, copy=True), labels.to_numpy(np.int64, copy=True), path)
