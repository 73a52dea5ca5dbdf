"""Long-tail generator (original code: src/longTailDataGeneator.py; docs/climbq.md, 'Long-tailed data'): counts,
order, seeded nested sampling, manifests."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from paperlib.data.long_tail import (
    CIFAR10_LT_ORDER,
    check_class_counts,
    gamma_tag,
    long_tail_counts,
    long_tail_order,
    long_tail_subset,
    read_class_counts,
    write_long_tail_manifests,
)

DIGITS_AVAILABLE = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn digits, classes 0..9


# --------------------------------------------------------------------------------------------- order


def test_digits_order_is_head_first():
    assert long_tail_order(DIGITS_AVAILABLE) == [3, 5, 1, 6, 4, 9, 7, 0, 2, 8]


def test_order_ties_go_to_the_higher_class_id():
    assert long_tail_order([5, 7, 5, 7]) == [3, 1, 2, 0]
    assert long_tail_order([5000] * 4) == [3, 2, 1, 0]


def test_order_equals_stable_argsort_reversed_on_random_counts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(0, 6, size=rng.integers(2, 30))
        order = long_tail_order(counts)
        assert order == list(np.argsort(counts, kind="stable")[::-1])
        assert all(counts[a] >= counts[b] for a, b in zip(order, order[1:], strict=False))


# --------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [
        (10, [183, 141, 109, 84, 65, 50, 38, 29, 22, 17]),
        (50, [183, 118, 76, 49, 31, 20, 12, 7, 4, 2]),
        (100, [183, 109, 65, 38, 22, 13, 7, 4, 2, 1]),
    ],
)
def test_digits_counts_recursive_rule(gamma, expected):
    available = [DIGITS_AVAILABLE[c] for c in long_tail_order(DIGITS_AVAILABLE)]
    assert long_tail_counts(available, gamma) == expected


def test_digits_gamma10_sum():
    available = sorted(DIGITS_AVAILABLE, reverse=True)
    assert sum(long_tail_counts(available, 10)) == 738


def test_digits_gamma200_zero_class_error_names_gamma_class_and_fixes():
    order = long_tail_order(DIGITS_AVAILABLE)
    available = [DIGITS_AVAILABLE[c] for c in order]
    with pytest.raises(ValueError) as err:
        long_tail_counts(available, 200, names=order)
    msg = str(err.value)
    assert "gamma=200" in msg
    assert "class 8" in msg and "rank 9" in msg  # digit 8 is the tail (rank 9)
    assert "smaller gamma" in msg and "mode='closed_form'" in msg and "min_count=1" in msg
    # the fixes it names work (min_count), or are honest (closed_form also floors 183/200 to 0 here)
    assert long_tail_counts(available, 200, min_count=1) == [183, 101, 56, 31, 17, 9, 4, 2, 1, 1]
    with pytest.raises(ValueError, match="min_count=1") as err2:
        long_tail_counts(available, 200, mode="closed_form")
    assert "long_tail_counts(..., mode='closed_form')" not in str(err2.value)  # not the mode already used


@pytest.mark.parametrize(
    ("gamma", "expected", "total"),
    [
        (10, [5000, 3871, 2997, 2320, 1796, 1390, 1076, 833, 644, 498], 20425),
        (50, [5000, 3237, 2095, 1356, 877, 567, 367, 237, 153, 99], 13988),
        (200, [5000, 2775, 1540, 854, 474, 263, 145, 80, 44, 24], 11199),
    ],
)
def test_cifar10_shipped_counts(gamma, expected, total):
    counts = long_tail_counts([5000] * 10, gamma)
    assert counts == expected
    assert sum(counts) == total


def test_cifar100_shipped_counts_compounding_floors():
    c10 = long_tail_counts([500] * 100, 10)
    assert min(c10) == 32 and sum(c10) == 18292
    assert c10[0] / c10[-1] == pytest.approx(15.625)  # real ratio 15.6 > gamma = 10
    c50 = long_tail_counts([500] * 100, 50, allow_empty=True)
    assert c50.count(0) == 10 and sum(c50) == 11761
    c200 = long_tail_counts([500] * 100, 200, allow_empty=True)
    assert c200.count(0) == 28 and sum(c200) == 8883
    with pytest.raises(ValueError, match=r"gamma=50 .*class 90 \(rank 90 of 100"):
        long_tail_counts([500] * 100, 50)


def test_cifar100_closed_form_has_no_empty_class():
    c = long_tail_counts([500] * 100, 200, mode="closed_form")
    assert min(c) == 2 and c[0] == 500  # floor(500/200)


@pytest.mark.parametrize(("gamma", "expected"), [
    (1, [1000] * 10),
    (10, [1000, 774, 599, 463, 358, 277, 214, 165, 127, 98]),
    (200, [1000, 555, 308, 170, 94, 52, 28, 15, 8, 4]),
])
def test_syndigits_num_cls_data_json_counts(gamma, expected):
    assert long_tail_counts([1000] * 10, gamma) == expected


def test_closed_form_against_numpy_oracle_and_recursive_never_exceeds_it():
    rng = np.random.default_rng(1)
    for _ in range(30):
        k = int(rng.integers(2, 40))
        n_max = int(rng.integers(50, 5000))
        gamma = float(rng.uniform(1, 100))
        closed = long_tail_counts([n_max] * k, gamma, "closed_form", allow_empty=True)
        oracle = np.floor(n_max * gamma ** (-np.arange(k) / (k - 1)) + 1e-9).astype(int)
        assert closed == oracle.tolist()
        rec = long_tail_counts([n_max] * k, gamma, allow_empty=True)
        assert all(r <= c for r, c in zip(rec, closed, strict=True))
        assert rec == sorted(rec, reverse=True)


def test_counts_are_capped_by_availability():
    assert long_tail_counts([100, 90, 10], 2) == [100, 70, 10]  # min(int(70.7 * .707), 10)


def test_counts_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"gamma=0.5 < 1"):
        long_tail_counts([10, 10], 0.5)
    with pytest.raises(ValueError, match="head first"):
        long_tail_counts([5, 10], 2)
    with pytest.raises(ValueError, match="mode="):
        long_tail_counts([10, 10], 2, mode="linear")
    with pytest.raises(ValueError, match="at least 2 classes"):
        long_tail_counts([10], 2)
    with pytest.raises(TypeError, match="gamma"):
        long_tail_counts([10, 10], float("nan"))
    with pytest.raises(ValueError, match="min_count=20 exceeds"):
        long_tail_counts([30, 10], 2, min_count=20)


def test_gamma_tag():
    assert gamma_tag(10) == "10" and gamma_tag(10.0) == "10" and gamma_tag(2.5) == "2.5"


def test_read_class_counts_and_mapping_counts(tmp_path):
    path = tmp_path / "result10.json"
    path.write_text(json.dumps({"1": 774, "0": 1000, "2": 599}, indent=4))
    assert read_class_counts(path) == [1000, 774, 599]
    assert check_class_counts({"0": 5, "1": 3}).tolist() == [5.0, 3.0]
    with pytest.raises(ValueError, match="0..K-1"):
        check_class_counts({"0": 5, "2": 3})
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_class_counts(path)


def test_check_class_counts_rejects_zero_with_the_generator_fixes():
    assert check_class_counts(torch.tensor([3, 2])).tolist() == [3.0, 2.0]
    with pytest.raises(ValueError, match=r"class 1 \(label 1 of 3\).*min_count=1"):
        check_class_counts([4, 0, 2])


# --------------------------------------------------------------------------------------------- in memory


def _original_sampling(y: np.ndarray, order: list[int], counts: list[int]) -> list[np.ndarray]:
    """The generator's loop with NumPy's *global* legacy RNG, as written in longTailDataGeneator.py."""
    state = np.random.get_state()
    try:
        out = []
        for rank, (c, n) in enumerate(zip(order, counts, strict=True)):
            items = np.flatnonzero(y == c)
            np.random.seed(rank)
            out.append(items[np.random.choice(range(len(items)), n, replace=False)])
        return out
    finally:
        np.random.set_state(state)


def test_subset_matches_the_original_seeded_sampling_and_relabels_to_rank():
    rng = np.random.default_rng(2)
    y = rng.permutation(np.repeat(np.arange(10), DIGITS_AVAILABLE))
    sub = long_tail_subset(y, 10)
    assert sub.order == [3, 5, 1, 6, 4, 9, 7, 0, 2, 8]
    assert sub.counts == [183, 141, 109, 84, 65, 50, 38, 29, 22, 17]
    np.testing.assert_array_equal(sub.indices, np.concatenate(_original_sampling(y, sub.order, sub.counts)))
    # explicit relabelling: label = rank of the original class, label 0 = head (digit 3)
    np.testing.assert_array_equal(sub.labels, sub.to_rank[y[sub.indices]])
    np.testing.assert_array_equal(np.array(sub.order)[sub.labels], y[sub.indices])
    assert np.bincount(sub.labels).tolist() == sub.counts
    assert len(set(sub.indices.tolist())) == sub.indices.size  # without replacement
    np.testing.assert_array_equal(sub.relabel([3, 8, 0]), [0, 9, 7])


def test_subsets_are_nested_across_gamma():
    y = np.repeat(np.arange(6), 40)
    a, b = long_tail_subset(y, 5), long_tail_subset(y, 20)
    for rank in range(6):
        ia, ib = a.indices[a.labels == rank], b.indices[b.labels == rank]
        np.testing.assert_array_equal(ib, ia[: ib.size])  # permutation(len)[:n]: a prefix


def test_subset_accepts_tensors_and_class_order():
    y = torch.arange(4).repeat_interleave(20)
    sub = long_tail_subset(y, 4, class_order=[2, 0, 1, 3])
    assert sub.order == [2, 0, 1, 3] and sub.counts == [20, 12, 7, 4]
    assert (y.numpy()[sub.indices[:20]] == 2).all()
    with pytest.raises(ValueError, match="permutation"):
        long_tail_subset(y, 4, class_order=[0, 0, 1, 2])


def test_subset_zero_class_error_names_the_original_class():
    y = np.repeat(np.arange(10), DIGITS_AVAILABLE)
    with pytest.raises(ValueError, match=r"gamma=200 .*class 8 "):
        long_tail_subset(y, 200)


# --------------------------------------------------------------------------------------------- manifests


def _make_folder(root, split, sizes):
    for cls, n in sizes.items():
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i:04d}.png").write_bytes(b"")
        (d / ".hidden").write_bytes(b"")  # dot files are not images


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [(p, int(lab)) for p, lab in rows[1:]]


def test_manifests_replay_the_original_layout(tmp_path):
    _make_folder(tmp_path, "train", {"a": 8, "b": 12, "c": 10})
    _make_folder(tmp_path, "test", {"a": 3, "b": 3, "c": 3})
    out = tmp_path / "out"
    res = write_long_tail_manifests(tmp_path, 4, "toy", out)
    assert res.classes == ["b", "c", "a"] and res.counts == [12, 6, 3]
    assert res.train_csv == out / "toy_train4.csv" and res.test_written
    header, rows = _read_csv(res.train_csv)
    assert header == ["image", "label"]
    # class by class, each in the original's seeded order over the sorted files
    for rank, (cls, n) in enumerate(zip(res.classes, res.counts, strict=True)):
        files = sorted(f"train/{cls}/{f.name}" for f in (tmp_path / "train" / cls).glob("*.png"))
        picked = np.random.RandomState(rank).permutation(len(files))[:n]
        assert [p for p, lab in rows if lab == rank] == [files[j] for j in picked]
    _, test_rows = _read_csv(res.test_csv)
    assert [lab for _, lab in test_rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test_rows[0][0] == "test/b/0000.png"  # relabelled with the same order: b is the head
    assert json.loads(res.counts_json.read_text()) == {"0": 12, "1": 6, "2": 3}
    assert read_class_counts(res.counts_json) == res.counts
    assert res.counts_json == out / "num_cls_data" / "result4.json"
    assert not [p for p in out.rglob("*.tmp")]  # atomic writes leave no temporaries


def test_test_manifest_is_written_only_if_missing(tmp_path):
    _make_folder(tmp_path, "train", {"x": 6, "y": 6})
    _make_folder(tmp_path, "test", {"x": 2, "y": 2})
    first = write_long_tail_manifests(tmp_path, 2, "s")
    first.test_csv.write_text("image,label\nsentinel,0\n")
    second = write_long_tail_manifests(tmp_path, 3, "s")
    assert not second.test_written and first.test_csv.read_text() == "image,label\nsentinel,0\n"
    assert (tmp_path / "s_train2.csv").exists() and (tmp_path / "s_train3.csv").exists()
    assert json.loads((tmp_path / "num_cls_data" / "result3.json").read_text()) == {"0": 6, "1": 2}


def test_cifar10_shipped_order_is_replayed(tmp_path):
    _make_folder(tmp_path, "train", dict.fromkeys(CIFAR10_LT_ORDER, 100))
    res = write_long_tail_manifests(tmp_path, 10, "cifar10", class_order=CIFAR10_LT_ORDER, test_split=None)
    assert res.classes == list(CIFAR10_LT_ORDER) and res.test_csv is None
    _, rows = _read_csv(res.train_csv)
    assert {p.split("/")[1] for p, lab in rows if lab == 0} == {"cat"}
    assert {p.split("/")[1] for p, lab in rows if lab == 9} == {"bird"}
    with pytest.raises(ValueError, match="class folders"):
        write_long_tail_manifests(tmp_path, 10, "c", class_order=CIFAR10_LT_ORDER[:9])


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        write_long_tail_manifests(tmp_path, 10, "none")
    _make_folder(tmp_path, "train", {"a": 4, "b": 4})
    _make_folder(tmp_path, "test", {"a": 1, "z": 1})
    with pytest.raises(ValueError, match=r"test classes \['z'\]"):
        write_long_tail_manifests(tmp_path, 2, "bad")
