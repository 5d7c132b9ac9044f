"""Dataset specs and their loaders, on small data written in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from beyond_icon import data
from beyond_icon.data import datasets, write_idx


def _write_fashion(directory, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(
            directory / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8)
        )


def test_fashion_mnist_from_data_dir_and_env(tmp_path, monkeypatch):
    _write_fashion(tmp_path / "fm")
    loaded = data.load("fashion-mnist", data_dir=tmp_path / "fm")
    assert loaded.x_train.shape == (20, 1, 28, 28) and loaded.x_test.shape == (10, 1, 28, 28)
    assert loaded.classes[9] == "Ankle boot"
    _write_fashion(tmp_path / "env" / "fashion-mnist", n_train=30)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))  # $BEYOND_ICON_DATA/fashion-mnist
    assert len(data.load("fashion-mnist").x_train) == 30


def test_fashion_mnist_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", data_dir=tmp_path)


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(datasets, "FASHION_URL", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(RuntimeError, match="could not download"):
        data.load("fashion-mnist", data_dir=tmp_path, download=True)
    assert not list(tmp_path.rglob("*.part"))


def test_download_checksum_is_checked(tmp_path, monkeypatch):
    payload = tmp_path / "served.bin"
    payload.write_bytes(b"not the real file")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        datasets._download(payload.as_uri(), tmp_path / "out.gz", "0" * 32)
    datasets._download(payload.as_uri(), tmp_path / "ok.gz", datasets._md5(payload))
    assert (tmp_path / "ok.gz").read_bytes() == b"not the real file"


def _write_image_folder(root, split_dirs=True, size=(12, 12), mode="RGB"):
    rng = np.random.default_rng(1)
    splits = ("train", "test") if split_dirs else ("",)
    for split in splits:
        for c, name in enumerate(("cat", "dog", "frog")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(6 if split != "test" else 2):
                shape = (*size, 3) if mode == "RGB" else size
                pixels = np.clip(rng.normal(60 * c + 40, 20, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode).save(folder / f"{i}.png")


def test_imagefolder_with_splits(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    loaded = data.load(f"imagefolder:{tmp_path / 'imgs'}")
    assert loaded.x_train.shape == (18, 3, 12, 12) and loaded.x_train.dtype == np.uint8
    assert loaded.x_test.shape == (6, 3, 12, 12) and loaded.classes == ["cat", "dog", "frog"]
    assert (tmp_path / "imgs" / ".beyond-icon-cache.npz").is_file()
    again = data.load(f"imagefolder:{tmp_path / 'imgs'}")  # from the cache
    assert np.array_equal(again.x_train, loaded.x_train) and again.classes == loaded.classes


def test_imagefolder_without_splits_grey(tmp_path):
    _write_image_folder(tmp_path / "flat", split_dirs=False, mode="L")
    loaded = data.load(f"imagefolder:{tmp_path / 'flat'}")
    assert loaded.x_train.shape[1:] == (1, 12, 12)
    assert len(loaded.x_train) + len(loaded.x_test) == 18 and not loaded.has_test_split


@pytest.mark.parametrize("fmt", ["npz", "npy", "pt"])
def test_embeddings_formats(tmp_path, fmt):
    x, y = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32), np.arange(40) % 4
    path = tmp_path / f"emb.{fmt}"
    if fmt == "npz":
        np.savez(path, features=x, labels=y)
    elif fmt == "npy":
        np.save(path, x)
        np.save(tmp_path / "emb.labels.npy", y)
    else:
        torch.save({"x": torch.tensor(x), "y": torch.tensor(y)}, path)
    loaded = data.load(f"embeddings:{path}")
    assert len(loaded.x_train) == 30 and len(loaded.x_test) == 10 and loaded.x_train.shape[1] == 5


def test_embeddings_bad_inputs(tmp_path):
    np.savez(tmp_path / "short.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(ValueError, match="5 embeddings but 4 labels"):
        data.load(f"embeddings:{tmp_path / 'short.npz'}")
    np.savez(tmp_path / "nan.npz", x=np.full((8, 2), np.nan), y=np.arange(8) % 2)
    with pytest.raises(ValueError, match="NaN"):
        data.load(f"embeddings:{tmp_path / 'nan.npz'}")
    np.savez(tmp_path / "keys.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="needs features"):
        data.load(f"embeddings:{tmp_path / 'keys.npz'}")


def test_simplex_geometry():
    loaded = data.load("simplex:5")
    x = np.concatenate([loaded.x_train, loaded.x_test])
    y = np.concatenate([loaded.y_train, loaded.y_test])
    centres = np.stack([x[y == c].mean(0) for c in range(5)])
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(5, 1)]
    assert x.shape[1] == 4 and np.allclose(d, np.sqrt(2), atol=0.05)


def test_digits_split_is_fixed_and_stratified():
    a, b = data.load("digits"), data.load("digits")
    assert np.array_equal(a.y_test, b.y_test) and len(a.x_train) + len(a.x_test) == 1797
    counts = np.bincount(a.y_test)
    assert counts.min() >= 40


def test_unknown_spec():
    with pytest.raises(ValueError, match="unknown data spec"):
        data.load("mnist-but-not")


def _cifar_dir(tmp_path, planted=None):
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": [0, 1, 2, 3],
        }
        with open(root / name, "wb") as handle:
            pickle.dump(planted if planted and name == "data_batch_3" else entry, handle)
    return tmp_path


class _Planted:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_cifar10_batches_in_the_official_format_load(tmp_path):
    loaded = data.load("cifar10", data_dir=_cifar_dir(tmp_path))
    assert loaded.x_train.shape == (20, 3, 32, 32) and loaded.y_test.tolist() == [0, 1, 2, 3]


def test_a_planted_cifar10_batch_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _cifar_dir(tmp_path, planted={b"data": _Planted(), b"labels": [0]})
    with pytest.raises(ValueError, match="not an official CIFAR-10 batch: it asks to load"):
        data.load("cifar10", data_dir=root)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("kind", ["truncated", "objects", "not-a-zip"])
def test_broken_features_files_never_advise_unsafe_loading(tmp_path, kind):
    path = tmp_path / "f.npz"
    if kind == "objects":
        np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    elif kind == "truncated":
        np.savez(path, x=np.zeros((50, 8)), y=np.arange(50))
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="is not a valid features file") as info:
        data.load(f"embeddings:{path}")
    assert "allow_pickle" not in str(info.value) and "\n" not in str(info.value)


def test_labels_and_test_splits_are_checked(tmp_path):
    np.savez(tmp_path / "float.npz", x=np.zeros((6, 2)), y=np.array([0.5, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="must be integer class labels"):
        data.load(f"embeddings:{tmp_path / 'float.npz'}")
    np.savez(tmp_path / "whole.npz", x=np.zeros((12, 2)), y=np.arange(12.0) % 2)
    assert data.load(f"embeddings:{tmp_path / 'whole.npz'}").y_train.dtype == np.int64
    np.savez(tmp_path / "half.npz", x=np.zeros((6, 2)), y=np.arange(6) % 2, x_test=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="has x_test but no y_test"):
        data.load(f"embeddings:{tmp_path / 'half.npz'}")


def test_n_train_zero_is_an_error():
    from beyond_icon.tasks.cluster import ClusterConfig
    from beyond_icon.tasks.common import load_task_data

    with pytest.raises(ValueError, match="n_train must be a positive integer"):
        load_task_data(ClusterConfig(data="digits", n_train=0))


def test_a_subset_larger_than_its_split_is_an_error():
    """--n-train 100000 on digits' 1,347 training points is refused, not cut silently."""
    from beyond_icon.tasks.cluster import ClusterConfig
    from beyond_icon.tasks.common import load_task_data

    with pytest.raises(ValueError, match="n_train = 100000 is more than the 1347 points"):
        load_task_data(ClusterConfig(data="digits", n_train=100_000))
    with pytest.raises(ValueError, match="n_test = 451 is more than the 450 points of the test"):
        load_task_data(ClusterConfig(data="digits", n_test=451))
    assert len(load_task_data(ClusterConfig(data="digits", n_train=1347)).x_train) == 1347
    # leaving out fewer points than classes: a plain random subset (stratifying cannot)
    assert len(load_task_data(ClusterConfig(data="digits", n_train=1346)).x_train) == 1346


@pytest.mark.parametrize(
    "labels, names",
    [
        ([-1, 0, 1], ["-1", "0", "1"]),
        ([0, 5, 9], ["0", "5", "9"]),
        ([0, 100000, 200000], ["0", "100000", "200000"]),
        ([0, 1, 2], ["0", "1", "2"]),  # already compact: as before
    ],
)
def test_embedding_labels_are_made_compact_and_keep_their_values_as_names(tmp_path, labels, names):
    """Labels such as {-1, 0, 1}, {0, 5, 9} or {0, 100000, ...} would be read as max + 1
    classes or index the last class with -1: they become 0 .. C-1, named by their values."""
    y = np.repeat(labels, 8)
    x = np.random.default_rng(0).normal(size=(len(y), 4)).astype(np.float32)
    np.savez(tmp_path / "e.npz", x=x, y=y)
    dataset = data.load(f"embeddings:{tmp_path / 'e.npz'}")
    assert dataset.classes == names and dataset.n_classes == 3
    assert set(dataset.y_train) == {0, 1, 2}
    np.savez(tmp_path / "t.npz", x=x, y=y, x_test=x[:6], y_test=y[:6])
    dataset = data.load(f"embeddings:{tmp_path / 't.npz'}")
    assert dataset.classes == names and np.array_equal(dataset.y_test, np.zeros(6))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((0, 4)), "y": np.zeros(0, dtype=int)}, "features holds no rows"),
        ({"x": np.float32(1.0), "y": np.zeros(1, dtype=int)}, "features holds no rows"),
        ({"x": np.zeros((6, 0)), "y": np.arange(6) % 2}, "features has no features"),
        (
            {"x": np.zeros((6, 4)), "y": np.arange(6) % 2, "x_test": np.zeros((2, 5))}
            | {"y_test": np.arange(2)},
            "x_test has 5 features per row, the features 4",
        ),
        (
            {"x": np.vstack([np.full((1, 4), np.nan), np.zeros((7, 4))]), "y": np.arange(8) % 2},
            r"features rows \[0\] contain NaN",  # the file's row, not a split's
        ),
        ({"x": np.full((6, 4), 1e39), "y": np.arange(6) % 2}, "beyond float32's range"),
    ],
)
def test_embeddings_of_no_rows_no_features_or_other_widths_are_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        data.load(f"embeddings:{tmp_path / 'bad.npz'}")


def test_a_dataset_refuses_labels_outside_its_classes():
    with pytest.raises(ValueError, match=r"train labels must be in \[0, number of classes\)"):
        datasets.Dataset(
            "d", np.zeros((2, 1)), np.array([0, 2]), np.zeros((1, 1)), np.zeros(1), ["a", "b"]
        )
    with pytest.raises(ValueError, match="got -1 to 0"):
        datasets.Dataset("d", np.zeros((2, 1)), np.array([-1, 0]), np.zeros((1, 1)), np.zeros(1))


def test_a_split_made_here_keeps_each_samples_source_row(tmp_path):
    """The 75/25 split of a file without one records each sample's row: whole() gives the
    file back in its order, and a subset keeps the rows of what it takes."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), np.arange(40) % 4
    np.savez(tmp_path / "e.npz", x=x, y=y)
    loaded = data.load(f"embeddings:{tmp_path / 'e.npz'}")
    assert not loaded.has_test_split
    for split in ("train", "test"):
        rows = getattr(loaded, f"{split}_rows")
        assert np.array_equal(getattr(loaded, f"x_{split}"), x[rows])
        assert np.array_equal(getattr(loaded, f"y_{split}"), y[rows])
    whole = loaded.whole()
    assert np.array_equal(whole.x_train, x) and np.array_equal(whole.y_train, y)
    assert np.array_equal(whole.train_rows, np.arange(40)) and len(whole.x_test) == 0
    part = whole.subset(n_train=12)
    assert len(part.x_train) == 12 and np.array_equal(part.x_train, x[part.train_rows])
    assert np.all(np.diff(part.train_rows) > 0)  # still in the file's order
    # an image folder without test/: the rows survive the folder's cache
    _write_image_folder(tmp_path / "flat", split_dirs=False, mode="L")
    first = data.load(f"imagefolder:{tmp_path / 'flat'}")
    cached = data.load(f"imagefolder:{tmp_path / 'flat'}")
    assert np.array_equal(first.train_rows, cached.train_rows)
    assert np.array_equal(cached.whole().x_train[cached.train_rows], cached.x_train)
    # a cache written before the rows were kept is rebuilt, not read without them
    cache = tmp_path / "flat" / ".beyond-icon-cache.npz"
    with np.load(cache) as stored:
        old = {k: stored[k] for k in stored.files if k not in ("train_rows", "test_rows")}
    np.savez(cache, **old)
    rebuilt = data.load(f"imagefolder:{tmp_path / 'flat'}")
    assert np.array_equal(rebuilt.train_rows, first.train_rows)
    # a dataset with a split of its own knows no rows; whole() still joins its splits
    own = datasets.Dataset("own", x[:30], y[:30], x[30:], y[30:])
    assert own.train_rows is None and np.array_equal(own.whole().x_train, x)
