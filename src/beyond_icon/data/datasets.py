"""Datasets by spec: digits, fashion-mnist, cifar10, imagefolder:PATH, embeddings:PATH, simplex:K.

:func:`load` returns a :class:`Dataset` with train and test splits. Images are stored as
``uint8`` arrays of shape (N, C, H, W) (values 0..255); vectors as ``float32`` (N, D). Nothing
is fetched from the network unless the user allows it (``download=True``); a missing dataset
is a clear error that says how to get it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from beyond_icon.data.idx import read_idx

__all__ = ["DATA_ENV", "Dataset", "fingerprint", "load", "spec_names"]

DATA_ENV = "BEYOND_ICON_DATA"
SPLIT_SEED = 0  # fixed: every run of every task sees the same split


@dataclass
class Dataset:
    """Train and test arrays of one dataset. ``x`` is uint8 (N, C, H, W) or float32 (N, D).

    Parameters
    ----------
    name : str
    x_train, x_test : arrays
        uint8 (N, C, H, W) images or float (N, D) vectors (a memory map for a features folder).
    y_train, y_test : (N,) integer arrays
    classes : list of str
    has_test_split : bool
        False when the split was made here (75/25, stratified, fixed).
    train_rows, test_rows : (N,) integer arrays, optional
        Where a split was made here: each sample's row in the source (the file, or the
        folder's sorted images), so that :meth:`whole` restores the source order and a task
        can say which input row each result belongs to. None when unknown.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str] = field(default_factory=list)
    has_test_split: bool = True
    train_rows: np.ndarray | None = None
    test_rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(f"{self.name}: {len(x)} {split} samples but {len(y)} labels")
            bad = _nonfinite_rows(x)
            if len(bad):
                raise ValueError(
                    f"{self.name}: {split} samples {bad[:5].tolist()} contain NaN or Inf"
                )
        self.y_train = self.y_train.astype(np.int64)
        self.y_test = self.y_test.astype(np.int64)
        for split in ("train", "test"):
            y = getattr(self, f"y_{split}")
            if len(y) and (y.min() < 0 or (self.classes and y.max() >= len(self.classes))):
                raise ValueError(
                    f"{self.name}: {split} labels must be in [0, number of classes), got "
                    f"{int(y.min())} to {int(y.max())}"
                )
        if not self.classes:
            n = int(max(self.y_train.max(initial=0), self.y_test.max(initial=0))) + 1
            self.classes = [str(c) for c in range(n)]

    @property
    def is_image(self) -> bool:
        return self.x_train.ndim == 4

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(
        self, n_train: int | None = None, n_test: int | None = None, seed: int = 0
    ) -> Dataset:
        """A stratified random subset of each split (``None`` keeps a split whole)."""
        keep_train = _stratified_take(self.y_train, n_train, seed)
        keep_test = _stratified_take(self.y_test, n_test, seed + 1)

        def take(array, keep):
            return array if array is None or keep is None else array[keep]

        return Dataset(
            self.name,
            take(self.x_train, keep_train),
            take(self.y_train, keep_train),
            take(self.x_test, keep_test),
            take(self.y_test, keep_test),
            classes=self.classes,
            has_test_split=self.has_test_split,
            train_rows=take(self.train_rows, keep_train),
            test_rows=take(self.test_rows, keep_test),
        )

    def fingerprint(self) -> str:
        """:func:`fingerprint` of both splits (arrays and labels)."""
        return fingerprint(self.x_train, self.y_train, self.x_test, self.y_test)

    def whole(self) -> Dataset:
        """Every sample as the train split, with an empty test split: for a dataset whose split
        was made here (``has_test_split`` False), in the source's row order where it is known
        (``train_rows``), else the train split then the test split (an ``extract`` folder:
        the order of its ``files_train.txt`` then ``files_test.txt``). The samples are read
        into memory (a memory-mapped table too).

        Returns
        -------
        Dataset
        """
        x = np.concatenate([self.x_train, self.x_test])
        y = np.concatenate([self.y_train, self.y_test])
        rows = None
        if self.train_rows is not None and self.test_rows is not None:
            rows = np.concatenate([self.train_rows, self.test_rows])
            order = np.argsort(rows, kind="stable")
            x, y, rows = x[order], y[order], rows[order]
        return Dataset(
            self.name,
            x,
            y,
            x[:0],
            y[:0],
            classes=self.classes,
            has_test_split=False,
            train_rows=rows,
            test_rows=None if rows is None else rows[:0],
        )

    def describe(self) -> str:
        kind = (
            "images " + "x".join(map(str, self.input_shape))
            if self.is_image
            else f"{self.input_shape[0]}-d vectors"
        )
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test, {kind}, "
            f"{self.n_classes} classes"
        )


def as_float(x: np.ndarray) -> np.ndarray:
    """uint8 images to float32 in [0, 1]; float arrays unchanged (as float32)."""
    if x.dtype == np.uint8:  # one pass, no float32 temporary (the same values as astype / 255)
        return np.divide(x, np.float32(255.0), dtype=np.float32)
    return x.astype(np.float32, copy=False)


FINGERPRINT_ROWS = 1024


def fingerprint(*arrays: np.ndarray) -> str:
    """A short description and hash of ``arrays`` (a run's data), to tell the data a run was
    trained on from other data under the same name: each array's shape and dtype, and a SHA-1
    of every label-sized array (1-D) and of ``FINGERPRINT_ROWS`` evenly spaced rows of the
    others (a memory-mapped table is not read whole).

    Parameters
    ----------
    *arrays : arrays
        E.g. ``x_train, y_train, x_test, y_test``.

    Returns
    -------
    str
        ``"60000x784 uint8, 60000 int64, ... #1a2b3c4d5e6f"``.
    """
    digest = hashlib.sha1()
    shapes = []
    for array in arrays:
        array = np.asarray(array) if not isinstance(array, np.ndarray) else array
        shapes.append("x".join(map(str, array.shape)) + f" {array.dtype}")
        digest.update(shapes[-1].encode())
        if array.ndim > 1 and len(array) > FINGERPRINT_ROWS:
            array = array[np.linspace(0, len(array) - 1, FINGERPRINT_ROWS).astype(np.int64)]
        digest.update(np.ascontiguousarray(array).tobytes())
    return f"{', '.join(shapes)} #{digest.hexdigest()[:12]}"


def _stratified_take(y, n, seed):
    """The sorted indices of a stratified random subset of ``n`` of the labels ``y`` (None:
    all of them)."""
    if n is None or n >= len(y):
        return None
    if n < 1:
        raise ValueError(f"a subset needs at least one sample, got {n}")
    from sklearn.model_selection import train_test_split

    # stratified when what is left out can hold every class too (scikit-learn's condition)
    classes = len(np.unique(y))
    stratify = _stratify(y, n) if len(y) - n >= classes else None
    keep, _ = train_test_split(
        np.arange(len(y)), train_size=n, stratify=stratify, random_state=seed
    )
    return np.sort(keep)


def _stratify(y, n):
    """Stratify when every class can be represented, else a plain random split."""
    _, counts = np.unique(y, return_counts=True)
    return y if counts.min() >= 2 and n >= len(counts) else None


def _nonfinite_rows(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """Indices of rows holding NaN or Inf, checked in blocks of rows (a memory-mapped array is
    read once and never copied whole)."""
    if x.dtype.kind not in "fc" or not len(x):
        return np.zeros(0, dtype=np.int64)
    flat = x.reshape(len(x), -1)
    bad = [
        start + np.flatnonzero(~np.isfinite(flat[start : start + block]).all(1))
        for start in range(0, len(flat), block)
    ]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def split_indices(y: np.ndarray, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train / test split of a dataset without one: (train, test) indices."""
    from sklearn.model_selection import train_test_split

    return train_test_split(
        np.arange(len(y)),
        test_size=test_fraction,
        stratify=_stratify(y, len(y)),
        random_state=SPLIT_SEED,
    )


def _split(name, x, y, classes=None, test_fraction=0.25):
    idx_train, idx_test = split_indices(y, test_fraction)
    return Dataset(
        name,
        x[idx_train],
        y[idx_train],
        x[idx_test],
        y[idx_test],
        classes or [],
        has_test_split=False,
        train_rows=np.asarray(idx_train, dtype=np.int64),
        test_rows=np.asarray(idx_test, dtype=np.int64),
    )


# -------------------------------------------------------------------------------- the loaders


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    data = _split("digits", images, bunch.target, [str(c) for c in range(10)])
    data.has_test_split = True  # the split is part of the dataset's definition here
    return data


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _search_dirs(data_dir: str | Path | None, sub: str) -> list[Path]:
    dirs = []
    for base in (data_dir, os.environ.get(DATA_ENV)):
        if base:
            dirs += [Path(base), Path(base) / sub]
    return dirs


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, md5: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url}: {error}") from error
    if md5 is not None and _md5(partial) != md5:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"checksum mismatch for {url}: the download is corrupt, try again")
    partial.replace(target)


def load_fashion_mnist(data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Fashion-MNIST from IDX files: --data-dir, $BEYOND_ICON_DATA, the Debian package, download."""
    candidates = _search_dirs(data_dir, "fashion-mnist") + [FASHION_SYSTEM_DIR]
    for directory in candidates:
        paths = [_find_idx(directory, name[:-3]) for name in FASHION_FILES]
        if all(paths):
            break
    else:
        if not download:
            looked = ", ".join(str(d) for d in candidates)
            raise FileNotFoundError(
                "Fashion-MNIST not found (looked in " + looked + "). Install the Debian package "
                "(apt-get install dataset-fashion-mnist), put the four IDX .gz files in --data-dir "
                f"or ${DATA_ENV}, or pass --download when online"
            )
        directory = (
            Path(data_dir or os.environ.get(DATA_ENV) or Path.home() / ".cache" / "beyond-icon")
            / "fashion-mnist"
        )
        for name, md5 in FASHION_FILES.items():
            if not (directory / name).is_file():
                _download(FASHION_URL + name, directory / name, md5)
        paths = [directory / name for name in FASHION_FILES]
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    if x_train.shape[1:] != (28, 28) or len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(
            f"Fashion-MNIST files in {directory} have unexpected shapes {x_train.shape}"
        )
    return Dataset(
        "fashion-mnist", x_train[:, None], y_train, x_test[:, None], y_test, FASHION_CLASSES
    )


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class _CifarUnpickler(pickle.Unpickler):
    """Reads the official CIFAR-10 python batches and nothing else.

    They hold a dict of bytes keys, lists of ints and bytes, and one numpy array; any other
    global a pickle asks for (the way a planted file would run code) is refused.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ValueError(
                f"{self.path} is not an official CIFAR-10 batch: it asks to load {module}.{name}, "
                "which a CIFAR-10 file never does (refused, nothing was run)"
            )
        return super().find_class(module, name)

    def load(self):
        try:
            return super().load()
        except ValueError:
            raise
        except Exception as error:  # truncated or not a pickle at all
            raise ValueError(
                f"{self.path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error})"
            ) from None


def load_cifar10(data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """CIFAR-10 from the official python batches (cifar-10-batches-py), or a checked download."""
    candidates = [d / "cifar-10-batches-py" for d in _search_dirs(data_dir, "cifar10")]
    candidates += _search_dirs(data_dir, "cifar-10-batches-py")
    found = next((d for d in candidates if (d / "data_batch_1").is_file()), None)
    if found is None:
        if not download:
            raise FileNotFoundError(
                "CIFAR-10 python batches not found (looked for cifar-10-batches-py in --data-dir and "
                f"${DATA_ENV}). Pass --download when online, or use an image folder of CIFAR-10 "
                "JPEGs with --data imagefolder:PATH"
            )
        root = Path(data_dir or os.environ.get(DATA_ENV) or Path.home() / ".cache" / "beyond-icon")
        archive = root / "cifar-10-python.tar.gz"
        if not archive.is_file():
            _download(CIFAR10_URL, archive, CIFAR10_MD5)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        found = root / "cifar-10-batches-py"

    def batch(name):
        path = found / name
        with open(path, "rb") as handle:
            entry = _CifarUnpickler(handle, path).load()
        try:
            data, labels = entry[b"data"], entry[b"labels"]
            x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(labels, dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} is not an official CIFAR-10 batch (no data/labels)") from None
        if len(x) != len(y):
            raise ValueError(
                f"{path} is not an official CIFAR-10 batch: {len(x)} images, {len(y)} labels"
            )
        return x, y

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return Dataset(
        "cifar10",
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        x_test,
        y_test,
        CIFAR10_CLASSES,
    )


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _list_class_folders(root: Path, classes: list[str] | None = None):
    """(files, labels, classes) of a class-per-subfolder image folder, in a fixed order."""
    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    else:  # a test/ folder: a class that train/ lacks would be dropped without a word
        extra = sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir() and d.name not in classes and not d.name.startswith(".")
        )
        if extra:
            raise ValueError(
                f"image folder {root} has class folders that the training split lacks: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; every class needs "
                "training images (move or remove them)"
            )
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        found = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(
            f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files, np.asarray(labels, dtype=np.int64), classes


@dataclass
class ImageFolderFiles:
    """The files of an image folder per split, listed without decoding any image.

    ``splits`` maps ``train`` / ``test`` to (files, labels); a folder without train/ and test/
    sub-folders gets the fixed stratified 75/25 split of :func:`load_imagefolder`.
    """

    root: Path
    classes: list[str]
    splits: dict[str, tuple[list[Path], np.ndarray]]
    has_test_split: bool


def list_imagefolder(path: str | Path) -> ImageFolderFiles:
    """The files and labels of ``imagefolder:PATH``, split as :func:`load_imagefolder` splits
    them (see there)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if (root / "train").is_dir():
        files, labels, classes = _list_class_folders(root / "train")
        if (root / "test").is_dir():
            test_files, test_labels, _ = _list_class_folders(root / "test", classes)
            splits = {"train": (files, labels), "test": (test_files, test_labels)}
            return ImageFolderFiles(root, classes, splits, True)
    else:
        files, labels, classes = _list_class_folders(root)
    train, test = split_indices(labels)
    splits = {
        "train": ([files[i] for i in train], labels[train]),
        "test": ([files[i] for i in test], labels[test]),
    }
    return ImageFolderFiles(root, classes, splits, False)


def _read_class_folders(root: Path, classes: list[str] | None, size: tuple[int, int] | None):
    from PIL import Image

    files, labels, classes = _list_class_folders(root, classes)
    images = []
    mode = None
    quiet = True if len(files) < 2000 else None  # None: a bar only on a terminal
    for path in tqdm(files, desc=f"decoding {root.name}", unit="img", leave=False, disable=quiet):
        with Image.open(path) as image:
            if mode is None:
                mode = "L" if image.mode in ("L", "1", "I;16", "I") else "RGB"
                size = size or image.size
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return np.stack(images), np.asarray(labels), classes, size


def load_imagefolder(path: str | Path, cache: bool = True) -> Dataset:
    """Class-per-subfolder images; train/ and test/ sub-folders are the splits when present.

    Images take the mode (grey or RGB) and size of the first one. The decoded arrays are cached
    in ``PATH/.beyond-icon-cache.npz`` (or the user cache when PATH is read-only).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    stamp = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            stamp.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    key = stamp.hexdigest()[:16]
    cache_files = [
        root / ".beyond-icon-cache.npz",
        Path.home() / ".cache" / "beyond-icon" / f"imagefolder-{key}.npz",
    ]
    for cached in cache_files:
        if cache and cached.is_file():
            with np.load(cached, allow_pickle=False) as data:
                # a split made here and cached before its source rows were kept is rebuilt:
                # clustered whole, it would not come back in the folder's order
                stale = not bool(data["has_test_split"]) and "train_rows" not in data.files
                if str(data["key"]) == key and not stale:
                    rows = {
                        name: data[name] if name in data.files else None
                        for name in ("train_rows", "test_rows")
                    }
                    return Dataset(
                        root.name,
                        data["x_train"],
                        data["y_train"],
                        data["x_test"],
                        data["y_test"],
                        [str(c) for c in data["classes"]],
                        has_test_split=bool(data["has_test_split"]),
                        **rows,
                    )
    if (root / "train").is_dir():
        x_train, y_train, classes, size = _read_class_folders(root / "train", None, None)
        if (root / "test").is_dir():
            x_test, y_test, _, _ = _read_class_folders(root / "test", classes, size)
            data = Dataset(root.name, x_train, y_train, x_test, y_test, classes)
        else:
            data = _split(root.name, x_train, y_train, classes)
    else:
        x, y, classes, _ = _read_class_folders(root, None, None)
        data = _split(root.name, x, y, classes)
    if cache:
        arrays = dict(
            x_train=data.x_train,
            y_train=data.y_train,
            x_test=data.x_test,
            y_test=data.y_test,
            classes=np.asarray(data.classes),
            has_test_split=data.has_test_split,
            key=key,
        )
        if data.train_rows is not None:
            arrays |= dict(train_rows=data.train_rows, test_rows=data.test_rows)
        for cached in cache_files:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp.npz")
                np.savez(tmp, **arrays)
                tmp.replace(cached)
                break
            except OSError:
                continue
    return data


def _read_arrays(path: Path, suffix: str) -> dict:
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix == ".pt":
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a .pt embeddings file must hold a dict of tensors")
        return {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in loaded.items()}
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(
                "reading .safetensors needs the safetensors package (pip install safetensors)"
            ) from error
        return load_file(str(path))
    if suffix == ".npy":
        labels = path.with_suffix(".labels.npy")
        if not labels.is_file():
            raise FileNotFoundError(f"labels for {path} not found: expected {labels}")
        return {"x": np.load(path, allow_pickle=False), "y": np.load(labels, allow_pickle=False)}
    raise ValueError(f"{path}: embeddings must be .npz, .npy, .pt or .safetensors")


def _labels(values, path: Path, name: str) -> np.ndarray:
    """Integer class labels, or a one-line error (float labels are never truncated)."""
    y = np.asarray(values).reshape(-1)
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise ValueError(
        f"{path}: {name} must be integer class labels, got {y.dtype} values such as "
        f"{y[:3].tolist()}"
    )


FEATURES_FORMAT = "beyond-icon-features/1"


def load_features_dir(path: str | Path) -> Dataset:
    """The features folder ``beyond-icon extract`` writes, memory-mapped: nothing is read
    until used, so a 1.28M x 768 float16 ImageNet table costs no memory to open.

    The folder holds ``meta.json`` (written last: its presence means the extraction finished),
    ``x_train.npy`` / ``x_test.npy`` (float16, n x d), ``y_*.npy`` (int64) and ``files_*.txt``.
    """
    import json

    root = Path(path).expanduser()
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        partial = (root / ".chunks").is_dir()
        raise ValueError(
            f"{root} is not a finished features folder (no meta.json)"
            + (
                "; an extraction into it was interrupted: run the same extract command again"
                if partial
                else ""
            )
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
    if meta.get("format") != FEATURES_FORMAT:
        raise ValueError(
            f"{meta_path}: unknown format {meta.get('format')!r}, expected {FEATURES_FORMAT}"
        )
    arrays = {}
    for split in ("train", "test"):
        try:
            x = np.load(root / f"x_{split}.npy", mmap_mode="r", allow_pickle=False)
            y = np.load(root / f"y_{split}.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{root}: cannot read the {split} split ({error})") from None
        if x.ndim != 2 or len(x) != meta["splits"][split]:
            raise ValueError(
                f"{root}: x_{split}.npy has shape {x.shape}, meta.json says "
                f"{meta['splits'][split]} rows"
            )
        arrays[split] = (x, _labels(y, root, f"y_{split}"))
    return Dataset(
        root.name,
        *arrays["train"],
        *arrays["test"],
        [str(c) for c in meta.get("classes", [])],
        has_test_split=bool(meta.get("has_test_split", True)),
    )


def load_embeddings(path: str | Path) -> Dataset:
    """Precomputed features and labels: .npz (x/features/embeddings and y/labels, optional
    x_test/y_test), .pt (a dict of the same keys), .safetensors, or .npy (features) with
    labels in PATH-without-suffix + '.labels.npy', or a folder written by ``beyond-icon
    extract`` (memory-mapped, see :func:`load_features_dir`). Without a test split, a fixed
    75/25 split.

    A file that cannot be read as plain arrays (truncated, not an archive, holding Python
    objects) is a one-line ``ValueError``; nothing in it is ever unpickled."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_features_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        arrays = _read_arrays(path, suffix)
    except (FileNotFoundError, ImportError):
        raise
    except (ValueError, OSError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile) as error:
        if str(error).startswith(str(path)):
            raise
        reason = str(error).split(";")[0].split("\n")[0]
        if "pickle" in reason.lower():  # never advise loading a file "unsafely"
            reason = "not an archive of plain arrays (truncated, or holding Python objects)"
        raise ValueError(f"{path} is not a valid features file: {reason}") from None

    def pick(*names):
        return next((arrays[n] for n in names if n in arrays), None)

    x = pick("x", "x_train", "features", "embeddings")
    y = pick("y", "y_train", "labels", "targets")
    if x is None or y is None:
        raise ValueError(
            f"{path}: needs features (x / features / embeddings) and labels (y / labels); "
            f"found keys {sorted(arrays)}"
        )
    x = _feature_rows(x, path, "features")
    y = _labels(y, path, "labels")
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} embeddings but {len(y)} labels")
    if ("x_test" in arrays) != ("y_test" in arrays):
        present, missing = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"{path}: has {present} but no {missing}; give both or neither")
    if "x_test" in arrays:
        x_test = _feature_rows(arrays["x_test"], path, "x_test")
        y_test = _labels(arrays["y_test"], path, "y_test")
        if len(x_test) != len(y_test):
            raise ValueError(f"{path}: {len(x_test)} test embeddings but {len(y_test)} test labels")
        if x_test.shape[1] != x.shape[1]:
            raise ValueError(
                f"{path}: x_test has {x_test.shape[1]} features per row, the features {x.shape[1]}"
            )
        (y, y_test), classes = _compact_labels(y, y_test)
        return Dataset(path.stem, x, y, x_test, y_test, classes)
    (y,), classes = _compact_labels(y)
    return _split(path.stem, x, y, classes)


def _feature_rows(values, path: Path, name: str) -> np.ndarray:
    """(n, d) float32 rows with n, d >= 1 and every value finite, or a one-line error naming
    the file's rows."""
    x = np.asarray(values)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{path}: {name} holds no rows (shape {x.shape})")
    if x.dtype.kind not in "iufb":
        raise ValueError(f"{path}: {name} must be real numbers, got {x.dtype}")
    with np.errstate(over="ignore"):  # beyond float32: inf, reported below
        x = x.astype(np.float32, copy=False).reshape(len(x), -1)
    if x.shape[1] == 0:
        raise ValueError(f"{path}: {name} has no features (shape {x.shape})")
    bad = _nonfinite_rows(x)
    if len(bad):
        raise ValueError(
            f"{path}: {name} rows {bad[:5].tolist()}{' and more' if len(bad) > 5 else ''} "
            "contain NaN or Inf (or values beyond float32's range)"
        )
    return x


def _compact_labels(*splits: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """Labels as 0 .. C-1 in the order of their values, and the values as the class names:
    labels such as {-1, 0, 1}, {0, 5, 9} or {0, 100000} would otherwise be read as classes
    that do not exist (a count of max + 1, or a negative index)."""
    values = np.unique(np.concatenate(splits))
    return [np.searchsorted(values, y) for y in splits], [str(v) for v in values.tolist()]


def load_simplex(k: int, n_per_cluster: int = 300, noise: float = 0.1, seed: int = 0) -> Dataset:
    """K Gaussian clusters at the vertices of a regular simplex in K-1 dimensions.

    Vertices are the standard basis of R^K, centred and rotated into R^(K-1) (pairwise
    distance sqrt 2); isotropic noise of standard deviation ``noise``. No 2-D embedding can keep
    K > 3 clusters equidistant: the crowding geometry of Beyond I-Con's Appendix B.
    """
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"simplex:K needs an integer K >= 2, got {k!r}")
    rng = np.random.default_rng(seed)
    centred = np.eye(k) - 1.0 / k
    basis = np.linalg.svd(centred)[2][: k - 1]  # orthonormal basis of the centred hyperplane
    vertices = centred @ basis.T
    y = np.repeat(np.arange(k), n_per_cluster)
    x = vertices[y] + noise * rng.standard_normal((len(y), k - 1))
    data = _split(f"simplex{k}", x.astype(np.float32), y)
    data.has_test_split = True
    return data


def same_spec(a: object, b: object) -> bool:
    """Whether two dataset specs name the same data: equal, or ``imagefolder:`` /
    ``embeddings:`` paths that resolve to the same file (relative paths from the working
    directory), so a run's settings match whether its data were given by a relative or an
    absolute path.

    Parameters
    ----------
    a, b : object
        Specs (anything else compares with ``==``).

    Returns
    -------
    bool
    """
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    (kind_a, _, path_a), (kind_b, _, path_b) = a.partition(":"), b.partition(":")
    kind = kind_a.strip().lower()
    if kind != kind_b.strip().lower() or kind not in ("imagefolder", "embeddings"):
        return False
    if not (path_a and path_b):
        return False
    return Path(path_a).expanduser().resolve() == Path(path_b).expanduser().resolve()


def spec_names() -> list[str]:
    """The dataset specs :func:`load` understands.

    Returns
    -------
    list of str
    """
    return [
        "digits",
        "fashion-mnist",
        "cifar10",
        "imagefolder:PATH",
        "embeddings:PATH",
        "simplex:K",
    ]


def load(spec: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Load a dataset by spec (see :func:`spec_names`).

    Parameters
    ----------
    spec : str
        ``digits``, ``fashion-mnist``, ``cifar10``, ``imagefolder:PATH``, ``embeddings:PATH``
        or ``simplex:K``.
    data_dir : path, optional
        Where to look for dataset files (also ``$BEYOND_ICON_DATA``).
    download : bool
        Fetch a missing dataset (checksummed); nothing is downloaded otherwise.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError, FileNotFoundError
        An unknown spec, or a missing dataset (the message says how to get it).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits":
        return load_digits()
    if kind in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(data_dir, download)
    if kind in ("cifar10", "cifar-10"):
        return load_cifar10(data_dir, download)
    if kind == "imagefolder" and arg:
        return load_imagefolder(arg)
    if kind == "embeddings" and arg:
        return load_embeddings(arg)
    if kind == "simplex":
        try:
            return load_simplex(int(arg))
        except ValueError:
            raise ValueError(
                f"'{spec}': simplex:K needs an integer K >= 2, e.g. simplex:10"
            ) from None
    raise ValueError(f"unknown data spec '{spec}'; known: {', '.join(spec_names())}")
