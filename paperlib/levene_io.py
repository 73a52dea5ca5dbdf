"""Reading features for the Levene command line: a CSV (a label column + feature columns) or an ``.npz``.

``python -m paperlib levene FILE`` runs :func:`paperlib.levene.levene_features` on the file; every bad input
raises :class:`FeatureFileError`, one line naming the file, the problem and the fix, which the command prints
before exiting 2. The file's kind is checked from its first bytes, not only its name: a ``.npy`` array, a
text file or a truncated archive named ``.npz`` is reported as what it is. Labels are class ids: whole
numbers below :data:`MAX_LABEL` in size (so a CSV label read as a float, or an ``int64``, holds it exactly);
features are real numbers (complex ones are refused, not cut to their real part).
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .levene import LeveneFeatures

#: largest class id accepted (2**53: every integer up to it is exact as a float64, the type CSV numbers parse to)
MAX_LABEL = 2**53
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or an empty zip
_COMPRESSED_CSV = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")  # suffixes pandas decompresses itself
_SAVE_HINT = "save it with np.savez(path, features=F, labels=y) (F: [N, D] real numbers, y: [N] integer class ids)"
_MAX_LISTED = 5


class FeatureFileError(ValueError):
    """The feature file cannot be used as it is."""


def _listed(values: list) -> str:
    more = f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
    return f"{values[:_MAX_LISTED]}{more}"


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
        raise FeatureFileError(f"{path}: {len(small)} class(es) {_listed(small.tolist())} have fewer than 2 samples; "
                               "drop them or collect more samples")
    return features, labels


def _check_label_values(values: np.ndarray, path: Path, where: str) -> np.ndarray:
    """``values`` (numbers) as int64 class ids; non-integral or out-of-range ones raise, naming them."""
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise FeatureFileError(f"{path}: labels must be integers (class ids 0, 1, 2, ...); bad {where} "
                                   f"{_listed(np.flatnonzero(bad).tolist())}: {_listed(values[bad].tolist())}")
        too_big = np.abs(values) > MAX_LABEL
    elif values.dtype.kind == "u":
        too_big = values > MAX_LABEL
    else:
        too_big = (values > MAX_LABEL) | (values < -MAX_LABEL)
    if too_big.any():
        raise FeatureFileError(f"{path}: label(s) {_listed(values[too_big].tolist())} at {where} "
                               f"{_listed(np.flatnonzero(too_big).tolist())} are out of range for class ids "
                               f"(|label| <= 2**53); fix the labels: class ids are 0, 1, 2, ...")
    return values.astype(np.int64)


def _file_kind(path: Path) -> str:
    """``"npz"``, ``"npy"`` or ``"other"`` from the first bytes of ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FeatureFileError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGICS):
        return "npz"
    return "other"


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("features", "labels") if k not in npz.files]
            if missing:
                raise FeatureFileError(f"{path}: missing array(s) {missing}; the .npz holds {npz.files}. "
                                       f"Re-{_SAVE_HINT}")
            arrays = {}
            for key in ("features", "labels"):
                try:
                    arrays[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise FeatureFileError(f"{path}: '{key}' is an object array (pickled Python objects), which "
                                           f"is not read for safety; convert it to numbers and re-{_SAVE_HINT}"
                                           ) from None
    except FeatureFileError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, KeyError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FeatureFileError(f"{path}: truncated or corrupt .npz archive ({reason}); copy it again or "
                               f"re-{_SAVE_HINT}") from None
    features, labels = arrays["features"], arrays["labels"]
    if np.iscomplexobj(features):
        raise FeatureFileError(f"{path}: 'features' are complex ({features.dtype}); Levene's test needs real numbers: "
                               "save their modulus (np.abs), their real part, or real and imaginary parts as "
                               "separate feature columns")
    if not np.issubdtype(features.dtype, np.number) or features.dtype == bool:
        raise FeatureFileError(f"{path}: 'features' has dtype {features.dtype}; it must be real numbers (float or int)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise FeatureFileError(f"{path}: 'labels' has dtype {labels.dtype}; use integer class ids "
                               "(e.g. labels.astype(np.int64) when they are whole numbers)")
    labels = _check_label_values(labels.reshape(-1), path, "position(s)").reshape(labels.shape)
    return features.astype(np.float64), labels


def _complex_hint(values: pd.Series) -> str:
    for v in values:
        try:
            if complex(str(v).strip().replace(" ", "")).imag != 0:
                return ("; complex numbers are not supported: write their modulus, their real part, or real and "
                        "imaginary parts as separate columns")
        except ValueError:
            continue
    return ""


def read_feature_file(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] float64, labels [N] int64)`` from a CSV or an ``.npz`` (keys ``features``, ``labels``)."""
    path = Path(path)
    if path.is_dir():
        raise FeatureFileError(f"{path}: is a folder; pass a CSV or an .npz file with 'features' and 'labels'")
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such file; pass a CSV or an .npz with 'features' and 'labels'")
    kind = _file_kind(path)
    if kind == "npy":
        raise FeatureFileError(f"{path}: is a single .npy array (np.save), not an .npz archive of features and "
                               f"labels; {_SAVE_HINT}")
    if path.suffix.lower() == ".npz":
        if kind != "npz":
            with open(path, "rb") as f:
                head = f.read(200)
            text = head.isascii() and b"\x00" not in head
            looks = ("it holds text: if it is a CSV, rename it to .csv; otherwise" if text
                     else f"it starts with {head[:8]!r}, not a zip header;")
            raise FeatureFileError(f"{path}: not an .npz archive, {looks} {_SAVE_HINT}")
        return _read_npz(path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as e:
        hint = ""
        if kind == "npz" and not path.name.lower().endswith(_COMPRESSED_CSV):
            hint = "; it is a zip archive: if it was written by np.savez, rename it to .npz"
        reason = " ".join(str(e).split())
        raise FeatureFileError(f"{path}: not a readable CSV ({reason}){hint}; expect a header with '{label_column}' "
                               "and feature columns") from None
    if label_column not in df.columns:
        raise FeatureFileError(f"{path}: no '{label_column}' column (columns: {list(df.columns)}); "
                               "name the label column with --label-column")
    feature_cols = [c for c in df.columns if c != label_column]
    if not feature_cols:
        raise FeatureFileError(f"{path}: no feature columns besides '{label_column}'")
    if df[label_column].isna().any():
        raise FeatureFileError(f"{path}: missing labels in rows {df.index[df[label_column].isna()][:5].tolist()}")
    if df[label_column].dtype == bool:
        raise FeatureFileError(f"{path}: labels are True/False; use integer class ids 0, 1, 2, ...")
    labels = pd.to_numeric(df[label_column], errors="coerce")
    if labels.isna().any():
        bad = labels.isna().to_numpy()
        raise FeatureFileError(f"{path}: labels must be integers (class ids 0, 1, 2, ...); bad rows (0-based) "
                               f"{_listed(np.flatnonzero(bad).tolist())}: {_listed(df[label_column][bad].tolist())}")
    label_values = labels.to_numpy()
    if label_values.dtype == object:  # integers beyond uint64: pandas keeps Python ints
        label_values = label_values.astype(np.float64)
    label_ids = _check_label_values(label_values, path, "rows (0-based)")
    numeric = df[feature_cols].apply(pd.to_numeric, errors="coerce")
    non_numeric = numeric.isna() & df[feature_cols].notna()
    if non_numeric.any().any():
        cols = [c for c in feature_cols if non_numeric[c].any()]
        first = df[cols[0]][non_numeric[cols[0]]]
        raise FeatureFileError(f"{path}: non-numeric values in column(s) {cols} (e.g. row {first.index[0]}: "
                               f"{first.iloc[0]!r}); features must be real numbers{_complex_hint(first)}")
    return _check(numeric.to_numpy(np.float64, copy=True), label_ids, path)


def check_levene_defined(result: LeveneFeatures, path: str | Path, mask_zeros: bool = True) -> None:
    """Raise :class:`FeatureFileError` when Levene's W of ``result`` is undefined (0/0, NaN).

    W is the ratio of the between-class to the within-class variation of the dispersions ``z`` (docs/climbq.md,
    'Levene analysis'; ``scipy.stats.levene`` returns NaN here too). Both vanish when every ``z`` is the same:
    every class has zero spread (all ``z = 0``: the feature values are equal within each class), or every
    sample lies at the same distance from its class centre. An infinite W (no variation within classes, some
    between them) is a defined, if extreme, result and passes (scipy gives ``inf``, ``p = 0`` as well).
    """
    if not math.isnan(result.W):
        return
    if np.all(result.z == 0):
        zeros = (" (exactly-zero entries are skipped as ClimbQ does; --keep-zeros counts them)" if mask_zeros
                 else "")
        raise FeatureFileError(f"{path}: Levene's W is undefined (0/0): every class has zero spread, all feature "
                               f"values are equal within each class{zeros}; the test needs features that vary "
                               "within classes: check that the file holds the model's features, not constants")
    raise FeatureFileError(f"{path}: Levene's W is undefined (0/0): every sample lies at the same distance "
                           f"({float(result.z[0]):g}) from its class centre, so the spread does not vary at all; "
                           "the test needs more varied features (or more samples per class)")
