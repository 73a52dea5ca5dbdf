"""Tests for paperlib.data: digits, in-memory tensors + loader, batched augmentation, CIFAR through
torchvision on fake pickles in the real format, the CIFAR exporter and the ``image,label`` manifest format."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from sklearn.datasets import load_digits as sk_load_digits
from sklearn.model_selection import train_test_split

from paperlib.data import (
    CIFAR_STATS,
    DIGITS_COUNTS,
    DataError,
    InMemoryData,
    ManifestDataset,
    RandomCropFlip,
    TensorLoader,
    export_cifar_to_folder,
    load_cifar,
    load_digits,
    load_manifest_tensors,
    manifest_loader,
    random_crop_flip,
    read_manifest,
)
from paperlib.data.errors import DataWarning

# ----------------------------------------------------------------------------------------------- fixtures


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_fake_cifar(root: Path, name: str = "cifar10", seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """Write torchvision's CIFAR layout with a few random rows per file; returns pixels/labels per split."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, label_key = root / "cifar-10-batches-py", "labels"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        rows, k = 4, 10
        _pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(k)]})
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        files = {"train": ["train"], "test": ["test"]}
        rows, k = 12, 100
        _pickle(folder / "meta", {"fine_label_names": [f"fine{c:02d}" for c in range(k)]})
    out = {}
    for split, names in files.items():
        datas, labels = [], []
        for fname in names:
            data = rng.integers(0, 256, size=(rows, 3072), dtype=np.uint8)
            lab = rng.integers(0, 3, size=rows).tolist()  # few classes so that within-class indices repeat
            _pickle(folder / fname, {"data": data, label_key: lab, "batch_label": fname})
            datas.append(data)
            labels += lab
        hwc = np.vstack(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out[split] = (hwc, labels)
    return out


@pytest.fixture
def no_md5(monkeypatch):
    """The fakes fail torchvision's md5 checks; accept existing files, as torchvision's own tests do."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


def make_folder(
    tmp_path: Path, n: int = 6, size: tuple[int, int] = (20, 12)
) -> tuple[Path, Path, np.ndarray]:
    """A tiny image folder (RGB PNGs of size (w, h)) plus an ``image,label`` CSV; returns dir, csv, pixels."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(n, size[1], size[0], 3), dtype=np.uint8)
    rows = []
    for i in range(n):
        rel = f"train/c{i % 3}/{i:03d}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(tmp_path / rel)
        rows.append((rel, i % 3))
    csv = tmp_path / "train.csv"
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(csv, index=False)
    return tmp_path, csv, pixels


def tiny_data(n: int = 10, classes: int = 3) -> InMemoryData:
    x = torch.arange(n * 3 * 4 * 4, dtype=torch.float32).view(n, 3, 4, 4)
    y = torch.arange(n) % classes
    return InMemoryData(x, y, [str(i) for i in range(classes)], (0.0,), (1.0,))


# ------------------------------------------------------------------------------------------------- digits


def test_digits_split_counts_sizes_and_stats():
    train, test = load_digits()
    assert train.x.shape == (1347, 1, 8, 8) and test.x.shape == (450, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.classes == [str(i) for i in range(10)] and train.num_classes == 10
    # per-class counts: exactly sklearn's stratified split of the shipped counts
    bunch = sk_load_digits()
    assert np.bincount(bunch.target).tolist() == DIGITS_COUNTS
    tr_idx, te_idx = train_test_split(np.arange(1797), test_size=0.25, stratify=bunch.target, random_state=0)
    assert train.class_counts() == np.bincount(bunch.target[tr_idx], minlength=10).tolist()
    assert test.class_counts() == np.bincount(bunch.target[te_idx], minlength=10).tolist()
    assert [a + b for a, b in zip(train.class_counts(), test.class_counts(), strict=True)] == DIGITS_COUNTS
    assert all(abs(t - 0.25 * c) <= 1 for t, c in zip(test.class_counts(), DIGITS_COUNTS, strict=True))
    # disjoint and complete
    src_tr, src_te = set(train.source_index.tolist()), set(test.source_index.tolist())
    assert not src_tr & src_te and src_tr | src_te == set(range(1797))
    assert torch.equal(train.y, torch.as_tensor(bunch.target[train.source_index.numpy()]))
    # train normalised to mean 0, std 1; denormalised pixels are the shipped pixels / 16
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std(correction=0).item() - 1) < 1e-5
    assert abs(test.x.mean().item()) < 0.1 and test.mean == train.mean and test.std == train.std
    expected = torch.as_tensor(bunch.images[test.source_index.numpy()] / 16, dtype=torch.float32)
    torch.testing.assert_close(test.denormalize()[:, 0], expected, atol=1e-5, rtol=0)


def test_digits_deterministic_and_seeded():
    a_train, a_test = load_digits(seed=0)
    b_train, b_test = load_digits(seed=0)
    assert a_train.fingerprint() == b_train.fingerprint() and a_test.fingerprint() == b_test.fingerprint()
    c_train, _ = load_digits(seed=1)
    assert set(c_train.source_index.tolist()) != set(a_train.source_index.tolist())
    assert c_train.fingerprint() != a_train.fingerprint()
    assert c_train.class_counts() == a_train.class_counts()  # stratified: same counts, different samples


def test_digits_resize_and_channels():
    train8, _ = load_digits()
    train, test = load_digits(size=32, channels=3)
    assert train.x.shape == (1347, 3, 32, 32) and test.x.shape == (450, 3, 32, 32)
    assert torch.equal(train.x[:, 0], train.x[:, 1]) and torch.equal(train.x[:, 0], train.x[:, 2])
    assert len(train.mean) == 3 and abs(train.x.mean().item()) < 1e-5
    assert abs(train.x.std(correction=0).item() - 1) < 1e-5
    # oracle: bilinear resize of the raw pixels / 16, then the stored normalisation
    raw = torch.as_tensor(sk_load_digits().images[train.source_index.numpy()] / 16, dtype=torch.float32)
    up = F.interpolate(raw.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(train.denormalize()[:, :1], up, atol=1e-5, rtol=0)
    assert train.mean != train8.mean  # stats are those of the resized train pixels


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"channels": 2}, {"test_fraction": 1.5}, {"test_fraction": 0.0}, {"seed": -1}]
)
def test_digits_bad_arguments(kwargs):
    with pytest.raises(DataError):
        load_digits(**kwargs)


# ----------------------------------------------------------------------------------------- InMemoryData


def test_inmemory_validation():
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(DataError, match="int64"):
        InMemoryData(x, torch.zeros(4, dtype=torch.int32), ["a"], (0.0,), (1.0,))
    with pytest.raises(DataError, match="labels must lie in"):
        InMemoryData(x, torch.tensor([0, 1, 2, 3]), ["a", "b"], (0.0,), (1.0,))
    with pytest.raises(DataError, match="one label per image"):
        InMemoryData(x, torch.zeros(3, dtype=torch.int64), ["a"], (0.0,), (1.0,))
    with pytest.raises(DataError, match="float32"):
        InMemoryData(x.double(), torch.zeros(4, dtype=torch.int64), ["a"], (0.0,), (1.0,))
    with pytest.raises(DataError, match="channels"):
        InMemoryData(x, torch.zeros(4, dtype=torch.int64), ["a"], (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(DataError, match="std must be > 0"):
        InMemoryData(x, torch.zeros(4, dtype=torch.int64), ["a"], (0.0,), (0.0,))


def test_inmemory_subset_counts_to_and_fingerprint():
    d = tiny_data(10, 3)
    assert len(d) == 10 and d.class_counts() == [4, 3, 3]
    sub = d.subset(torch.tensor([9, 0, 3]))
    assert torch.equal(sub.x, d.x[[9, 0, 3]]) and sub.y.tolist() == [0, 0, 0]
    assert sub.class_counts() == [3, 0, 0]
    mask = d.y == 1
    assert d.subset(mask).y.tolist() == [1, 1, 1] and len(d.subset(slice(2, 5))) == 3
    with pytest.raises(DataError, match="out of range"):
        d.subset([10])
    with pytest.raises(DataError, match="bool mask"):
        d.subset(torch.ones(3, dtype=torch.bool))
    assert d.to("cpu").fingerprint() == d.fingerprint() == d.subset(np.arange(10)).fingerprint()
    changed = d.subset(slice(None))
    changed.x[0, 0, 0, 0] += 1
    assert changed.fingerprint() != d.fingerprint()
    relabelled = InMemoryData(d.x, d.y, ["a", "b", "c"], d.mean, d.std)
    assert relabelled.fingerprint() != d.fingerprint()


def test_fingerprint_definition_is_stable():
    d = InMemoryData(
        torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2), torch.tensor([1, 0]), ["a", "b"],
        (0.5,), (0.25,),
    )
    h = hashlib.sha256(b"InMemoryData|x(2, 3, 2, 2):torch.float32|y(2,):torch.int64|a\x1fb")
    h.update(np.arange(24, dtype=np.float32).tobytes())
    h.update(np.array([1, 0], dtype=np.int64).tobytes())
    assert d.fingerprint() == h.hexdigest()
    # pinned: changing the scheme invalidates the data fingerprints recorded in run manifests
    assert d.fingerprint() == "a1e6124eafa79565131f7df1259311017e09ee232233d4b19323fddb2d97963c"


# ------------------------------------------------------------------------------------------ TensorLoader


def _epoch(loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_loader_order_len_and_drop_last():
    d = tiny_data(10, 3)
    loader = TensorLoader(d, batch_size=4)
    assert len(loader) == 3 and [len(y) for _, y in loader] == [4, 4, 2]
    x, y = _epoch(loader)
    assert torch.equal(x, d.x) and torch.equal(y, d.y)
    dl = TensorLoader(d, batch_size=4, drop_last=True)
    assert len(dl) == 2 and [len(y) for _, y in dl] == [4, 4]
    assert len(TensorLoader(d, batch_size=1)) == 10 and len(TensorLoader(d, batch_size=10)) == 1
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        TensorLoader(d, batch_size=0)
    with pytest.raises(DataError, match="no batch"):
        TensorLoader(d, batch_size=11, drop_last=True)
    with pytest.raises(TypeError):
        TensorLoader(d, batch_size=2.0)


def test_loader_shuffle_is_a_seeded_permutation():
    d = tiny_data(10, 3)
    a = TensorLoader(d, batch_size=3, shuffle=True, seed=5)
    x1, y1 = _epoch(a)
    x2, _ = _epoch(a)
    # each epoch is a permutation of the samples (x rows identify samples), pairs (x, y) preserved
    order1 = (x1[:, 0, 0, 0] / 48).long()
    assert sorted(order1.tolist()) == list(range(10)) and torch.equal(y1, d.y[order1])
    assert not torch.equal(x1, x2) and not torch.equal(x1, d.x)
    b = TensorLoader(d, batch_size=3, shuffle=True, seed=5)
    assert torch.equal(_epoch(b)[0], x1)
    assert not torch.equal(_epoch(TensorLoader(d, batch_size=3, shuffle=True, seed=6))[0], x1)


def test_loader_resume_draws_identical_batches():
    d = tiny_data(12, 3)
    aug = RandomCropFlip(padding=1)
    full = TensorLoader(d, batch_size=5, shuffle=True, augment=aug, seed=3)
    _epoch(full)
    second = [b for b in full]
    first = TensorLoader(d, batch_size=5, shuffle=True, augment=aug, seed=3)
    _epoch(first)
    state = first.state_dict()
    resumed = TensorLoader(d, batch_size=5, shuffle=True, augment=aug, seed=99)
    resumed.load_state_dict(state)
    again = [b for b in resumed]
    assert len(again) == len(second) == 3
    for (xa, ya), (xb, yb) in zip(again, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(DataError, match="state_dict"):
        resumed.load_state_dict({"seed": 3})


# ---------------------------------------------------------------------------------------------- augment


def _oracle_crop_flip(x, seed, padding, flip, fill):
    """Per-sample loop with the documented draw order: dy, dx (if padding), then flip bits (if flip)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    dy = dx = torch.zeros(n, dtype=torch.int64)
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    bits = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.int64)
    fill_t = torch.as_tensor(fill, dtype=x.dtype).expand(c)
    out = torch.empty_like(x)
    for i in range(n):
        padded = fill_t.view(c, 1, 1).repeat(1, h + 2 * padding, w + 2 * padding)
        padded[:, padding : padding + h, padding : padding + w] = x[i]
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(2) if bits[i] else crop
    return out


@pytest.mark.parametrize(
    "padding, flip, fill", [(4, True, 0.0), (2, False, (-1.0, 0.5, 2.0)), (0, True, 0.0), (3, True, -0.7)]
)
def test_random_crop_flip_matches_per_sample_loop(padding, flip, fill):
    x = torch.randn(16, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(7), padding=padding, flip=flip, fill=fill)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, _oracle_crop_flip(x, 7, padding, flip, fill), rtol=0, atol=0)
    cls_out = RandomCropFlip(padding, flip, fill)(x, torch.Generator().manual_seed(7))
    assert torch.equal(cls_out, out)


def test_random_crop_flip_properties():
    x = torch.randn(64, 3, 8, 8)
    same = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0, flip=False)
    assert torch.equal(same, x) and same is not x
    a = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(2)))
    # every output image is a (flipped) crop of the zero-padded input at some offset in [0, 8]^2
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(0, 64, 9):
        crops = [padded[i, :, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(a[i], cr) or torch.equal(a[i], cr.flip(2)) for cr in crops)
    # flips only: roughly half the images are mirrored
    flipped = random_crop_flip(x, torch.Generator().manual_seed(3), padding=0)
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(2)) for i in range(64))
    assert 16 <= n_flipped <= 48
    with pytest.raises(DataError, match="padding"):
        random_crop_flip(x, torch.Generator(), padding=-1)
    with pytest.raises(TypeError, match="torch.Generator"):
        random_crop_flip(x, 0)
    with pytest.raises(DataError, match="fill"):
        random_crop_flip(x, torch.Generator(), fill=(0.0, 1.0))


# ------------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_fake_cifar_round_trips(tmp_path, no_md5, name):
    truth = make_fake_cifar(tmp_path, name)
    for split, train in (("train", True), ("test", False)):
        data = load_cifar(tmp_path, name=name, train=train)
        pixels, labels = truth[split]
        assert data.x.shape == (len(labels), 3, 32, 32) and data.y.tolist() == labels
        assert data.mean == CIFAR_STATS[name][0] and data.std == CIFAR_STATS[name][1]
        assert data.num_classes == (10 if name == "cifar10" else 100)
        assert data.classes[1] == ("class1" if name == "cifar10" else "fine01")
        expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(data.denormalize(), expected, atol=2e-6, rtol=0)
        assert data.class_counts()[:3] == np.bincount(labels, minlength=3).tolist()


def test_load_dataset_passes_normalisation_constants_to_cifar(tmp_path, no_md5):
    """``load_dataset(..., mean=, std=)``: CIFAR with other constants (LifeQuant normalises CIFAR-100 with
    CIFAR-10's); without them the dataset's own, as before; digits keep their train statistics."""
    from paperlib.data.load import load_dataset

    make_fake_cifar(tmp_path, "cifar100")
    m, s = CIFAR_STATS["cifar10"]
    train, test = load_dataset("cifar100", tmp_path, mean=m, std=s)
    for split, data in (("train", train), ("test", test)):
        assert torch.equal(data.x, load_cifar(tmp_path, "cifar100", train=split == "train", mean=m, std=s).x)
        assert (data.mean, data.std) == (m, s)
    own, _ = load_dataset("cifar100", tmp_path)
    assert torch.equal(own.x, load_cifar(tmp_path, "cifar100").x) and own.mean == CIFAR_STATS["cifar100"][0]
    with pytest.raises(DataError, match="both mean and std"):
        load_dataset("cifar100", tmp_path, mean=m)
    with pytest.raises(DataError, match="mean/std apply to cifar10/cifar100 only"):
        load_dataset("digits", mean=m, std=s)


def test_cifar_missing_or_corrupt_root(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_cifar(missing, "cifar10", train=True)
    msg = str(info.value)
    assert str(missing / "cifar-10-batches-py") in msg and "download=True" in msg and "data_batch_1" in msg
    with pytest.raises(DataError, match="cifar-100-python"):
        load_cifar(missing, "cifar100", train=False)
    make_fake_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing \['data_batch_3'\]"):
        load_cifar(tmp_path, train=False)
    make_fake_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match="corrupted"):  # real md5 check: the fakes are not the real files
        load_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="unreadable"):
        load_cifar(tmp_path)
    with pytest.raises(DataError, match="unknown CIFAR"):
        load_cifar(tmp_path, name="cifar20")


def test_export_cifar_png_reads_back_identically(tmp_path, no_md5):
    root, out = tmp_path / "raw", tmp_path / "folder"
    truth = make_fake_cifar(root, "cifar10")
    csvs = export_cifar_to_folder(root, out, "cifar10", ext="png")
    assert set(csvs) == {"train", "test"} and csvs["train"] == out / "train.csv"
    assert (out / "train.csv").read_text().splitlines()[0] == "image,label"
    with pytest.warns(DataWarning, match=r"manifest .*train.csv: 7 of the num_classes=10 declared classes have no "
                                         r"row \(3, 4, 5, 6, 7 and 2 more\)"):  # a few fake rows: classes 0-2
        frame = read_manifest(csvs["train"], out, num_classes=10)
    labels = truth["train"][1]
    assert frame["label"].tolist() == labels and frame["label"].dtype == np.int64
    # index within class, in dataset order
    seen: dict[int, int] = {}
    for rel, lab in zip(frame["image"], labels, strict=True):
        assert rel == f"train/class{lab}/{seen.get(lab, 0):04d}.png"
        seen[lab] = seen.get(lab, 0) + 1
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    for split, train in (("train", True), ("test", False)):
        direct = load_cifar(root, "cifar10", train=train)
        m, s = CIFAR_STATS["cifar10"]
        back = load_manifest_tensors(out / f"{split}.csv", out, size=32, mean=m, std=s)
        assert torch.equal(back.x, direct.x) and torch.equal(back.y, direct.y)
    ds = ManifestDataset(csvs["test"], out)
    img, lab = ds[2]
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), truth["test"][0][2])
    assert lab == truth["test"][1][2]


def test_export_cifar100_jpg(tmp_path, no_md5):
    truth = make_fake_cifar(tmp_path / "raw", "cifar100")
    csvs = export_cifar_to_folder(tmp_path / "raw", tmp_path / "out", "cifar100", ext="jpg")
    with pytest.warns(DataWarning, match=r"97 of the num_classes=100 declared classes have no row"):
        frame = read_manifest(csvs["test"], tmp_path / "out", num_classes=100)
    assert frame["image"].str.match(r"test/fine0[0-2]/\d{4}\.jpg").all()
    assert frame["label"].tolist() == truth["test"][1]
    with pytest.raises(DataError, match="ext"):
        export_cifar_to_folder(tmp_path / "raw", tmp_path / "out", "cifar100", ext="gif")


# --------------------------------------------------------------------------------------------- manifest


def test_manifest_tensors_and_loaders(tmp_path):
    data_dir, csv, pixels = make_folder(tmp_path)
    with pytest.warns(DataWarning, match=r"2 of the num_classes=5 declared classes have no row \(3, 4\)"):
        d = load_manifest_tensors(csv, data_dir, size=12, num_classes=5)
    assert d.x.shape == (6, 3, 12, 12) and d.y.tolist() == [0, 1, 2, 0, 1, 2] and d.num_classes == 5
    assert d.classes == ["0", "1", "2", "3", "4"]
    assert load_manifest_tensors(csv, data_dir, size=12).classes == ["0", "1", "2"]
    # mean/std None: the images' own statistics -> normalised to mean 0, std 1 per channel
    torch.testing.assert_close(d.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    oracle = np.asarray(Image.fromarray(pixels[4]).resize((12, 12), Image.BILINEAR), dtype=np.float32) / 255
    got = d.denormalize()[4].permute(1, 2, 0)
    torch.testing.assert_close(got, torch.from_numpy(oracle), atol=1e-5, rtol=0)

    ds = ManifestDataset(csv, data_dir)
    assert len(ds) == 6 and ds.class_counts() == [2, 2, 2] and ds.targets == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(np.asarray(ds[5][0]), pixels[5])
    for train, size in ((True, 16), (False, 16), (True, 64), (False, 64)):
        loader = manifest_loader(csv, data_dir, batch_size=4, train=train, size=size)
        x, y = next(iter(loader))
        assert x.shape == (4, 3, size, size) and y.dtype == torch.int64
        assert len(loader) == (1 if train else 2)  # drop_last for training
    # eval order and labels follow the CSV
    ys = torch.cat([y for _, y in manifest_loader(csv, data_dir, batch_size=4, train=False, size=8)])
    assert ys.tolist() == [0, 1, 2, 0, 1, 2]


def test_manifest_tolerates_extra_columns(tmp_path):
    data_dir, csv, _ = make_folder(tmp_path)
    frame = pd.read_csv(csv)
    frame.to_csv(csv, index=True)  # pandas' unnamed index column, as some generators write
    got = read_manifest(csv, data_dir)
    assert got["label"].tolist() == [0, 1, 2, 0, 1, 2] and got["image"].tolist() == frame["image"].tolist()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_bad_inputs(tmp_path):
    data_dir, csv, _ = make_folder(tmp_path)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv", data_dir)
    with pytest.raises(DataError, match="not a directory"):
        read_manifest(csv, tmp_path / "nodir")
    with pytest.raises(DataError, match=r"no column\(s\) \['label'\]"):
        read_manifest(_write(tmp_path / "a.csv", "image,target\ntrain/c0/000.png,0\n"), data_dir)
    with pytest.raises(DataError, match="header"):
        read_manifest(_write(tmp_path / "b.csv", ""), data_dir)
    with pytest.raises(DataError, match="no rows"):
        read_manifest(_write(tmp_path / "c.csv", "image,label\n"), data_dir)
    bad = "image,label\ntrain/c0/000.png,0\ntrain/c1/001.png,cat\ntrain/c2/002.png,1.5\n"
    with pytest.raises(DataError, match=r"2 label\(s\) are not integers \(line 3: 'cat', line 4: '1.5'\)"):
        read_manifest(_write(tmp_path / "d.csv", bad), data_dir)
    with pytest.raises(DataError, match="negative"):
        read_manifest(_write(tmp_path / "e.csv", "image,label\ntrain/c0/000.png,-1\n"), data_dir)
    with pytest.raises(DataError, match=r"2 label\(s\) >= num_classes=2.*num_classes >= 3"):
        read_manifest(csv, data_dir, num_classes=2)
    assert len(read_manifest(csv, data_dir, num_classes=3)) == 6
    (data_dir / "train/c1/001.png").unlink()
    (data_dir / "train/c2/005.png").unlink()
    with pytest.raises(DataError, match=r"2 of 6 image file\(s\) missing.*c1/001.png.*c2/005.png"):
        read_manifest(csv, data_dir)
    assert len(read_manifest(csv, data_dir, check_files=False)) == 6
    with pytest.raises(DataError, match="missing"):
        load_manifest_tensors(csv, data_dir, size=8)
    (data_dir / "train/c1/001.png").write_bytes(b"garbage")
    frame = pd.DataFrame({"image": ["train/c0/000.png", "train/c1/001.png"], "label": [0, 1]})
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match="cannot decode"):
        load_manifest_tensors(tmp_path / "f.csv", data_dir, size=8)
