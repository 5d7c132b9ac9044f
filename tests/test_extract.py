"""beyond-icon extract: features from a frozen encoder, written for embeddings:PATH."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from beyond_icon.cli import main

ENCODER = """
import torch
def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
"""


def test_extract_with_a_local_encoder(tmp_path):
    (tmp_path / "enc.py").write_text(ENCODER)
    out = tmp_path / "emb.npz"
    code = main(
        [
            "extract",
            "--encoder",
            f"{tmp_path / 'enc.py'}:make",
            "--data",
            "digits",
            "--out",
            str(out),
            "--batch-size",
            "500",
            "--quiet",
        ]
    )
    assert code == 0
    emb = np.load(out)
    assert emb["x_train"].shape == (1347, 16) and emb["x_test"].shape == (450, 16)
    assert (
        main(
            [
                "cluster",
                "--data",
                f"embeddings:{out}",
                "--n-steps",
                "1",
                "--kmeans-init",
                "1",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
        == 0
    )


def test_extract_unknown_or_unreachable_encoder(tmp_path, capsys, monkeypatch):
    assert (
        main(
            ["extract", "--encoder", "resnet", "--data", "digits", "--out", str(tmp_path / "x.npz")]
        )
        == 2
    )
    assert "unknown encoder" in capsys.readouterr().err

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    assert (
        main(
            [
                "extract",
                "--encoder",
                "dinov2_vits14",
                "--data",
                "digits",
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
    assert "module:factory" in capsys.readouterr().err


# ------------------------------------------------------------------------- streamed extraction
FOLDER_ENCODER = """
import time
import torch
def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make()
    def forward(self, x):
        time.sleep(0.4)
        return self.inner(x)
def slow():
    return Slow()
"""


def _image_folder(root, per_class=10, classes=("ant", "bee", "cat"), size=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class colour, so the features cluster
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _extract_args(tmp_path, out, *extra, encoder="make"):
    if not (tmp_path / "fenc.py").is_file():
        (tmp_path / "fenc.py").write_text(FOLDER_ENCODER)
    return [
        "extract",
        "--encoder",
        f"{tmp_path / 'fenc.py'}:{encoder}",
        "--data",
        f"imagefolder:{tmp_path / 'images'}",
        "--out",
        str(out),
        "--image-size",
        "16",
        "--crop",
        "1",
        "--batch-size",
        "4",
        "--chunk-batches",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


@pytest.fixture
def folder(tmp_path):
    return _image_folder(tmp_path / "images")


def _features(out):
    return {s: np.load(out / f"x_{s}.npy") for s in ("train", "test")}


def test_streamed_features_equal_the_in_memory_path(tmp_path, folder):
    assert main(_extract_args(tmp_path, tmp_path / "streamed", "--workers", "2")) == 0
    assert main(_extract_args(tmp_path, tmp_path / "memory.npz")) == 0
    streamed, memory = _features(tmp_path / "streamed"), np.load(tmp_path / "memory.npz")
    assert streamed["train"].dtype == np.float16 and streamed["train"].shape == (30, 8)
    for split in ("train", "test"):
        np.testing.assert_array_equal(streamed[split], memory[f"x_{split}"].astype(np.float16))
        labels = np.load(tmp_path / "streamed" / f"y_{split}.npy")
        np.testing.assert_array_equal(labels, memory[f"y_{split}"])
    files = (tmp_path / "streamed" / "files_train.txt").read_text().split()
    assert files[0] == "train/ant/000.png" and len(files) == 30
    assert not (tmp_path / "streamed" / ".chunks").exists()  # joined and cleaned up
    # a finished folder is not redone; other settings into it are refused
    assert main(_extract_args(tmp_path, tmp_path / "streamed")) == 0
    assert main(_extract_args(tmp_path, tmp_path / "streamed", "--pooling", "mean")) == 2


def test_features_folder_loads_lazily_and_clusters(tmp_path, folder):
    from beyond_icon.data import load

    assert main(_extract_args(tmp_path, tmp_path / "f")) == 0
    dataset = load(f"embeddings:{tmp_path / 'f'}")
    assert isinstance(dataset.x_train, np.memmap) and dataset.x_train.dtype == np.float16
    assert dataset.classes == ["ant", "bee", "cat"] and len(dataset.x_test) == 15
    run = ["cluster", "--data", f"embeddings:{tmp_path / 'f'}", "--n-steps", "2"]
    assert main([*run, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_unfinished_features_folder_is_a_clear_error(tmp_path):
    from beyond_icon.data import load

    (tmp_path / "f" / ".chunks").mkdir(parents=True)
    with pytest.raises(ValueError, match="interrupted: run the same extract command again"):
        load(f"embeddings:{tmp_path / 'f'}")


def test_killed_extraction_resumes_to_the_same_features(tmp_path, folder):
    import signal
    import subprocess
    import sys
    import time

    assert main(_extract_args(tmp_path, tmp_path / "whole")) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "beyond_icon", *_extract_args(tmp_path, out, encoder="slow")]
    child = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list((out / ".chunks").glob("train-*[0-9].npz")) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    kept = sorted(p.name for p in (out / ".chunks").glob("*-*[0-9].npz"))
    assert kept and not (out / "meta.json").exists()  # killed part-way
    assert main(_extract_args(tmp_path, out, encoder="slow")) == 0
    whole, resumed = _features(tmp_path / "whole"), _features(out)
    for split in ("train", "test"):
        assert whole[split].tobytes() == resumed[split].tobytes()


def test_damaged_chunk_is_redone_and_other_settings_refused(tmp_path, folder):
    from beyond_icon.extract import _sources, load_encoder, stream_extract

    encoder = load_encoder(_write_encoder(tmp_path), 16)
    splits, classes, _ = _sources(f"imagefolder:{tmp_path / 'images'}", encoder, 1.0, None, False)
    out = tmp_path / "f"
    kwargs = dict(classes=classes, batch_size=4, chunk_batches=2, num_workers=0, crop=1.0)
    chunks = out / ".chunks"
    chunks.mkdir(parents=True)
    (chunks / "train-000000.npz").write_bytes(b"PK\x03\x04 truncated")  # damaged: redone
    stream_extract(encoder, splits, out, device=torch.device("cpu"), verbose=False, **kwargs)
    assert main(_extract_args(tmp_path, tmp_path / "g")) == 0
    np.testing.assert_array_equal(_features(out)["train"], _features(tmp_path / "g")["train"])
    # an interrupted folder resumed with another chunk size is refused, naming the setting
    (tmp_path / "h" / ".chunks").mkdir(parents=True)
    (tmp_path / "h" / ".chunks" / "manifest.json").write_text('{"chunk": 3}')
    (tmp_path / "h" / ".chunks" / "train-000000.npz").write_bytes(b"a chunk of that run")
    with pytest.raises(ValueError, match="other settings .*chunk"):
        stream_extract(encoder, splits, tmp_path / "h", device=torch.device("cpu"), **kwargs)


def test_a_first_run_that_wrote_no_chunk_does_not_hold_its_folder(tmp_path, folder, capsys):
    """A first extraction refused before any chunk (a wrong option) leaves a manifest only:
    the corrected command takes the folder, where it used to be refused as 'other settings'."""
    out = tmp_path / "f"
    assert main(_extract_args(tmp_path, out, "--pooling", "mean")) == 2
    assert "pooling" in capsys.readouterr().err
    assert (out / ".chunks" / "manifest.json").is_file()
    assert main(_extract_args(tmp_path, out)) == 0
    assert _features(out)["train"].shape == (30, 8)


def test_finished_folder_names_the_settings_that_differ(tmp_path, folder, capsys):
    out = tmp_path / "f"
    assert main(_extract_args(tmp_path, out)) == 0
    assert main(_extract_args(tmp_path, out, "--batch-size", "2")) == 2
    err = capsys.readouterr().err
    assert "other settings (batch_size, chunk differ, meta.json)" in err, err


@pytest.mark.parametrize("size", ["0", "-4", "100000"])
def test_image_size_out_of_range_is_refused(tmp_path, folder, capsys, size):
    assert main(_extract_args(tmp_path, tmp_path / "f", "--image-size", size)) == 2
    err = capsys.readouterr().err
    assert (
        f"image_size must be an integer in [1, 4096] or None (the encoder's own), got {size}" in err
    )
    assert not (tmp_path / "f" / "meta.json").exists()


def test_a_test_class_missing_from_train_is_refused(tmp_path, folder, capsys):
    from PIL import Image

    (folder / "test" / "zzz").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "test" / "zzz" / "0.png")
    (folder / "test" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    assert main(_extract_args(tmp_path, tmp_path / "f")) == 2
    err = capsys.readouterr().err
    assert "has class folders that the training split lacks: zzz" in err, err
    (folder / "test" / "zzz" / "0.png").unlink()
    (folder / "test" / "zzz").rmdir()
    assert main(_extract_args(tmp_path, tmp_path / "g")) == 0


def _write_encoder(tmp_path):
    (tmp_path / "fenc.py").write_text(FOLDER_ENCODER)
    return f"{tmp_path / 'fenc.py'}:make"


def test_corrupt_image_is_named_or_skipped(tmp_path, folder, capsys):
    bad = folder / "train" / "bee" / "004.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    assert main(_extract_args(tmp_path, tmp_path / "f")) == 2
    err = capsys.readouterr().err.strip()
    assert "bee/004.png" in err and "--skip-corrupt" in err and len(err.splitlines()) == 1
    with pytest.warns(UserWarning, match="skipped train/bee/004.png"):
        assert main(_extract_args(tmp_path, tmp_path / "f", "--skip-corrupt")) == 0
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["skipped"] == ["train/bee/004.png"] and meta["splits"]["train"] == 29
    assert "bee/004.png" not in (tmp_path / "f" / "files_train.txt").read_text()


def test_two_processes_extract_what_one_does(tmp_path, folder):
    from conftest import torchrun

    assert main(_extract_args(tmp_path, tmp_path / "one")) == 0
    torchrun(_extract_args(tmp_path, tmp_path / "two"))
    one, two = _features(tmp_path / "one"), _features(tmp_path / "two")
    for split in ("train", "test"):
        np.testing.assert_array_equal(one[split], two[split])


def test_named_encoders_say_what_was_tried(monkeypatch):
    from beyond_icon.extract import load_encoder

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError) as error:
        load_encoder("dino_vits16")
    message = str(error.value)
    assert "torch.hub facebookresearch/dino:main" in message and "Hugging Face" in message
    assert "\n" not in message


def test_token_encoders_pool_class_token_or_patch_mean():
    from beyond_icon.extract import Encoder

    tokens = torch.arange(24.0).reshape(2, 3, 4)  # (n, 1 + patches, d)

    class Tokens(torch.nn.Module):
        def forward(self, x):
            return tokens

    images = torch.zeros(2, 3, 4, 4)
    cls = Encoder(Tokens(), None, None, None, "cls").embed(images)
    mean = Encoder(Tokens(), None, None, None, "mean").embed(images)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="returns pooled features"):
        Encoder(torch.nn.Flatten(), None, None, None, "mean").embed(images)


class _FakeTransformers:
    """A stand-in for the transformers package: records what was asked, returns a tiny ViT-like
    module whose last_hidden_state is (n, 1 + patches, d)."""

    def __init__(self):
        self.asked = []
        fake = self

        class Output:
            def __init__(self, hidden):
                self.last_hidden_state = hidden

        class Model(torch.nn.Module):
            def forward(self, pixel_values):
                n = len(pixel_values)
                patches = pixel_values.reshape(n, 3, -1).transpose(1, 2)  # (n, HW, 3)
                cls = patches.mean(1, keepdim=True) * 0 + 7.0
                return Output(torch.cat([cls, patches], 1))

        class AutoModel:
            @staticmethod
            def from_pretrained(source, local_files_only=False):
                fake.asked.append((source, local_files_only))
                return Model()

        class Processor:
            def to_dict(self):
                return {
                    "image_mean": [0.5] * 3,
                    "image_std": [0.25] * 3,
                    "crop_size": {"height": 4},
                }

        class AutoImageProcessor:
            @staticmethod
            def from_pretrained(source, local_files_only=False):
                return Processor()

        self.AutoModel, self.AutoImageProcessor = AutoModel, AutoImageProcessor


def test_hugging_face_folder_and_cache(tmp_path, monkeypatch):
    import sys

    from beyond_icon.extract import load_encoder

    fake = _FakeTransformers()
    monkeypatch.setitem(sys.modules, "transformers", fake)
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    encoder = load_encoder(str(folder), pooling="mean")
    assert (encoder.image_size, encoder.mean, encoder.std) == (4, (0.5,) * 3, (0.25,) * 3)
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)  # 1.0 -> (1 - 0.5) / 0.25 = 2
    torch.testing.assert_close(encoder.embed(images), torch.full((2, 3), 2.0))
    cls = load_encoder(str(folder)).embed(images)
    torch.testing.assert_close(cls, torch.full((2, 3), 7.0))
    assert fake.asked[0] == (str(folder), True)  # never the network

    # a named encoder whose torch.hub copy is unreachable comes from the HF cache, offline
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    named = load_encoder("dinov2_vits14")
    assert fake.asked[-1] == ("facebook/dinov2-small", True) and named.image_size == 4
    with pytest.raises(ValueError, match="without config.json"):
        load_encoder(str(tmp_path))
