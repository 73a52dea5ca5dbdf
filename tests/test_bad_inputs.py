"""Bad ``image,label`` manifests and data arguments: one clear error (or a warning) before anything is sized.

Each case here used to train on, or allocate for, a class list nobody meant: a label 99999 made a 100000-class
model (and an 80 GB confusion matrix), 10**12 a MemoryError, a one-class manifest a 4-class model at 100 %.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from paperlib.data import DataError, load_manifest_tensors, read_manifest
from paperlib.data.errors import DataWarning
from paperlib.data.load import load_dataset
from paperlib.data.manifest import ManifestDataset


def _folder(root: Path, labels: list, name: str = "train.csv") -> Path:
    """One 6x6 PNG per label under ``root`` and an ``image,label`` CSV listing them; returns the CSV."""
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(labels):
        rel = f"img/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / rel)
        rows.append(f"{rel},{label}")
    csv = root / name
    csv.write_text("image,label\n" + "\n".join(rows) + "\n")
    return csv


def test_a_stray_large_label_is_refused_with_its_line(tmp_path):
    csv = _folder(tmp_path, [0, 1, 2, 0, 1, 99999])
    msg = (r"labels run up to 99999 \(line 7: '99999'\) but 99996 class index\(es\) below it never occur "
           r"\(3, 4, 5, 6, 7 and 99991 more\).*renumber the labels 0\.\.3, or pass num_classes=K")
    with pytest.raises(DataError, match=msg):
        read_manifest(csv, tmp_path)
    with pytest.raises(DataError, match="labels run up to 99999"):
        load_manifest_tensors(csv, tmp_path, size=6)
    with pytest.raises(DataError, match="labels run up to 99999"):
        ManifestDataset(csv, tmp_path)
    # declared: the existing range check names the label and the class indices
    with pytest.raises(DataError, match=r"1 label\(s\) >= num_classes=3 \(line 7: '99999'\); fix the labels "
                                        r"\(class indices 0\.\.2\)"):
        read_manifest(csv, tmp_path, num_classes=3)


def test_a_label_of_ten_to_the_twelve_is_an_error_not_a_memory_error(tmp_path):
    csv = _folder(tmp_path, [0, 1, 10**12])
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"labels run up to 1000000000000 \(line 4: '1000000000000'\) but "
                                        r"999999999998 class index\(es\)"):
        load_manifest_tensors(csv, tmp_path, size=6)
    assert time.perf_counter() - start < 5  # nothing of size 10**12 was built
    beyond_int64 = _folder(tmp_path / "b", [0, 1, "99999999999999999999"])
    with pytest.raises(DataError, match=r"1 label\(s\) are far too large.*line 4: '99999999999999999999'"):
        read_manifest(beyond_int64, tmp_path / "b")


@pytest.mark.parametrize("label", [0, 3])
def test_a_one_class_manifest_is_refused(tmp_path, label):
    csv = _folder(tmp_path, [label] * 4)
    with pytest.raises(DataError, match=rf"every row has label {label}, one class only; a classification split "
                                        r"needs labels of at least 2 classes"):
        read_manifest(csv, tmp_path)
    with pytest.raises(DataError, match="one class only"):
        read_manifest(csv, tmp_path, num_classes=4)  # declaring the class list does not make it a 4-class split


def test_num_classes_below_two_is_refused(tmp_path):
    csv = _folder(tmp_path, [0, 0, 0])
    with pytest.raises(DataError, match=r"num_classes must be >= 2 \(a classifier needs at least two classes\), "
                                        "got 1"):
        read_manifest(csv, tmp_path, num_classes=1)


def test_a_gap_in_an_inferred_class_list_is_refused_a_declared_one_warns(tmp_path):
    csv = _folder(tmp_path, [0, 2, 0, 2])
    with pytest.raises(DataError, match=r"labels run up to 2 .* 1 class index\(es\) below it never occur \(1\)"):
        read_manifest(csv, tmp_path)
    with pytest.warns(DataWarning, match=r"1 of the num_classes=3 declared classes have no row \(1\)"):
        frame = read_manifest(csv, tmp_path, num_classes=3)
    assert frame["label"].tolist() == [0, 2, 0, 2]
    with pytest.warns(DataWarning, match=r"8 of the num_classes=10 declared classes have no row "
                                         r"\(1, 3, 4, 5, 6 and 3 more\)"):
        data = load_manifest_tensors(csv, tmp_path, size=6, num_classes=10)
    assert data.num_classes == 10 and data.y.tolist() == [0, 2, 0, 2]


def test_a_complete_manifest_reads_without_warnings(tmp_path):
    csv = _folder(tmp_path, [1, 0, 2, 2, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = read_manifest(csv, tmp_path)
        data = load_manifest_tensors(csv, tmp_path, size=6, num_classes=3)
    assert frame["label"].tolist() == [1, 0, 2, 2, 0, 1] and data.classes == ["0", "1", "2"]


def test_train_cli_refuses_a_bad_manifest_in_one_line(tmp_path, capsys):
    """The path that trained a 100000-class model: ``python -m paperlib train --dataset manifest``."""
    from paperlib.train_cli import main

    _folder(tmp_path, [0, 1, 2, 0, 1, 99999])
    _folder(tmp_path, [0, 1, 2], name="test.csv")
    rc = main(["--method", "fp32", "--dataset", "manifest", "--data-dir", str(tmp_path), "--epochs", "1",
               "--device", "cpu", "--out", str(tmp_path / "out"), "--image-size", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: manifest ") and "labels run up to 99999" in err
    assert err.count("\n") == 1 and not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("size", [0, -8])
def test_load_dataset_refuses_a_size_that_is_not_positive(size):
    with pytest.raises(DataError, match=rf"size must be an int >= 1 or None \(the dataset's own size\), got {size}"):
        load_dataset("digits", size=size)


def test_manifest_labels_keep_their_values(tmp_path):
    """Good manifests are untouched: the labels come back as written (int64), padded or signed forms included."""
    csv = tmp_path / "m.csv"
    _folder(tmp_path, [0, 1, 2])
    csv.write_text("image,label\nimg/000.png, 02\nimg/001.png,+1\nimg/002.png,0\n")
    frame = read_manifest(csv, tmp_path)
    assert frame["label"].dtype == np.int64 and frame["label"].tolist() == [2, 1, 0]
    pd.testing.assert_series_equal(frame["image"], pd.Series(["img/000.png", "img/001.png", "img/002.png"],
                                                             name="image"))
