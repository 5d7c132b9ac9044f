"""``beyond-icon extract``: features of a dataset from a frozen encoder, for clustering.

Two outputs, chosen by ``--out``:

- a folder (the default; any path not ending in ``.npz``): **streamed**. Worker processes decode
  and resize the images (:class:`ImageFiles`), the encoder runs in batches (bf16 autocast on
  CUDA), and the features go to disk chunk by chunk as they come, then into memory-mapped
  float16 arrays. Peak memory does not grow with the number of images; an interrupted run
  continues from its last written chunk (:func:`stream_extract`); under torchrun every rank
  extracts its share of the chunks and rank 0 joins them. ``--data embeddings:FOLDER`` reads it
  back without loading it (:func:`beyond_icon.data.datasets.load_features_dir`).
- ``FILE.npz``: the whole dataset decoded in memory first (fine for CIFAR-sized data).

Encoders (:func:`load_encoder`): ``dinov2_vits14`` / ``dinov2_vitb14`` / ``dinov2_vitl14`` /
``dinov2_vitg14`` and DINO v1 ``dino_vits16`` / ``dino_vitb16`` from ``torch.hub`` (the network
or its cache) or the Hugging Face cache, a local Hugging Face-format folder (``config.json``
inside), or ``module:factory`` / ``path/to/file.py:factory``: a callable returning an
``nn.Module`` that maps float images in [0, 1] (or vectors) to (n, d) features or (n, t, d)
tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from beyond_icon import data as data_registry
from beyond_icon._imports import load_object
from beyond_icon.data import as_float
from beyond_icon.data.datasets import FEATURES_FORMAT, list_imagefolder
from beyond_icon.train import resolve_device

__all__ = [
    "Encoder",
    "ImageFiles",
    "POOLINGS",
    "extract",
    "load_encoder",
    "run_extract",
    "stream_extract",
]

#: torch.hub repository and Hugging Face id of each named encoder
HUB = {
    "dinov2_vits14": ("facebookresearch/dinov2", "facebook/dinov2-small"),
    "dinov2_vitb14": ("facebookresearch/dinov2", "facebook/dinov2-base"),
    "dinov2_vitl14": ("facebookresearch/dinov2", "facebook/dinov2-large"),
    "dinov2_vitg14": ("facebookresearch/dinov2", "facebook/dinov2-giant"),
    "dino_vits16": ("facebookresearch/dino:main", "facebook/dino-vits16"),
    "dino_vitb16": ("facebookresearch/dino:main", "facebook/dino-vitb16"),
}
DINO = tuple(HUB)
POOLINGS = ("cls", "mean")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------ encoders
class _HubTokens(nn.Module):
    """All output tokens (n, 1 + patches, d), class token first, of a torch.hub DINO ViT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self.model, "forward_features"):  # DINOv2
            out = self.model.forward_features(x)
            return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)
        return self.model.get_intermediate_layers(x, 1)[0]  # DINO v1: normed tokens


class _HFTokens(nn.Module):
    """``last_hidden_state`` (n, tokens, d) of a Hugging Face vision model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).last_hidden_state


@dataclass
class Encoder:
    """A frozen encoder with its input convention.

    Attributes
    ----------
    module : nn.Module
        Normalised float images (n, C, S, S) -> features (n, d) or tokens (n, t, d).
    image_size : int or None
        The side ``S`` it expects (None: images are passed at their own size).
    mean, std : tuple of float or None
        Per-channel normalisation applied before ``module`` (None: images in [0, 1]).
    pooling : {"cls", "mean"}
        For token outputs: the class token (the first) or the mean of the others (patches).
    name : str
    """

    module: nn.Module
    image_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    pooling: str = "cls"
    name: str = ""

    def to(self, device: torch.device) -> Encoder:
        self.module = self.module.to(device).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """(n, d) features of a batch: uint8 or [0, 1] float images, or vectors."""
        x = as_float_tensor(images)
        if x.dim() == 4:
            if self.mean is not None and x.shape[1] == 1 and len(self.mean) == 3:
                x = x.expand(-1, 3, -1, -1)
            size = self.image_size
            if size is not None and tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
                x = x.clamp(0, 1)
            if self.mean is not None:
                mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
                std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
                x = (x - mean) / std
        elif self.mean is not None:
            raise ValueError(f"{self.name} needs images (n, C, H, W), got {tuple(x.shape)}")
        out = self.module(x)
        if out.dim() == 3:
            out = out[:, 0] if self.pooling == "cls" else out[:, 1:].mean(1)
        elif self.pooling == "mean":
            raise ValueError(
                f"--pooling mean needs an encoder that returns tokens (n, t, d); {self.name} "
                f"returns pooled features {tuple(out.shape)}"
            )
        if out.dim() != 2 or len(out) != len(x):
            raise ValueError(f"the encoder must return (n, d) features, got {tuple(out.shape)}")
        return out


def as_float_tensor(x) -> Tensor:
    """uint8 -> float32 in [0, 1]; float tensors -> float32."""
    x = torch.as_tensor(x)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _from_hub(name: str) -> nn.Module:
    repo = HUB[name][0]
    try:  # from the hub cache without touching the network when the repo is there
        return torch.hub.load(repo, name, trust_repo=True, skip_validation=True)
    except Exception as error:
        raise RuntimeError(f"torch.hub {repo}: {type(error).__name__}: {error}") from None


def _from_hf(source: str, local_only: bool) -> tuple[nn.Module, dict]:
    try:
        from transformers import AutoImageProcessor, AutoModel
    except ImportError:
        raise RuntimeError("Hugging Face: the transformers package is not installed") from None
    try:
        model = AutoModel.from_pretrained(source, local_files_only=local_only)
        try:
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            config = processor.to_dict()
        except Exception:  # no preprocessor_config.json: ImageNet conventions
            config = {}
    except Exception as error:
        reason = str(error).split("\n")[0]
        raise RuntimeError(f"Hugging Face {source}: {type(error).__name__}: {reason}") from None
    return model, config


def _hf_size(config: dict, default: int) -> int:
    for key in ("crop_size", "size"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("height") or value.get("shortest_edge")
        if isinstance(value, int):
            return value
    return default


#: The largest ``image_size`` taken: a side of 4,096 is 50 MiB of float32 per RGB image
#: (DINOv2 was trained at 518).
MAX_IMAGE_SIZE = 4096


def load_encoder(name: str, image_size: int | None = None, pooling: str = "cls") -> Encoder:
    """An encoder by name, with its resolution and normalisation.

    Parameters
    ----------
    name : str
        ``dinov2_vit{s,b,l,g}14`` or ``dino_vit{s,b}16`` (torch.hub, then the Hugging Face
        cache), a folder holding a Hugging Face model (``config.json``), or ``module:factory`` /
        ``file.py:factory``.
    image_size : int, optional
        Input side, 1 to :data:`MAX_IMAGE_SIZE`; default the encoder's own (224 for the named ones; for a factory the images'
        own size, or 224 when streaming a folder of mixed sizes).
    pooling : {"cls", "mean"}
        Class token or mean of the patch tokens.

    Returns
    -------
    Encoder

    Raises
    ------
    RuntimeError
        One line naming every source tried, when a named encoder loads from none.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if image_size is not None and not (
        isinstance(image_size, (int, np.integer))
        and not isinstance(image_size, bool)
        and 1 <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ValueError(
            f"image_size must be an integer in [1, {MAX_IMAGE_SIZE}] or None (the encoder's "
            f"own), got {image_size!r}"
        )
    if name in HUB:
        tried = []
        try:
            module = _HubTokens(_from_hub(name))
            return Encoder(module, image_size or 224, IMAGENET_MEAN, IMAGENET_STD, pooling, name)
        except RuntimeError as error:
            tried.append(str(error))
        try:
            model, config = _from_hf(HUB[name][1], local_only=True)
            size = image_size or _hf_size(config, 224)
            mean = tuple(config.get("image_mean", IMAGENET_MEAN))
            std = tuple(config.get("image_std", IMAGENET_STD))
            return Encoder(_HFTokens(model), size, mean, std, pooling, name)
        except RuntimeError as error:
            tried.append(str(error))
        raise RuntimeError(
            f"could not load {name}: tried {'; '.join(tried)}. Give it the network, a filled "
            "cache ($TORCH_HOME/hub or $HF_HOME), a local Hugging Face folder, or your own "
            "encoder as module:factory"
        )
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is a folder without config.json: not a Hugging Face model")
        model, config = _from_hf(str(folder), local_only=True)
        size = image_size or _hf_size(config, 224)
        mean = tuple(config.get("image_mean", IMAGENET_MEAN))
        std = tuple(config.get("image_std", IMAGENET_STD))
        return Encoder(_HFTokens(model), size, mean, std, pooling, folder.name)
    if ":" not in name:
        raise ValueError(
            f"unknown encoder {name!r}: use one of {', '.join(DINO)}, a Hugging Face model "
            "folder, or module:factory"
        )
    factory = load_object(name, "encoder")
    if not callable(factory):
        raise ValueError(f"{name} is not callable")
    module = factory()
    if not isinstance(module, nn.Module):
        raise ValueError(f"{name} must return a torch.nn.Module, got {type(module).__name__}")
    size = image_size or getattr(module, "image_size", None)
    return Encoder(module, size, None, None, pooling, name)


# ------------------------------------------------------------------------- in-memory extraction
@torch.no_grad()
def extract(
    encoder: Encoder | nn.Module,
    x: np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device,
    desc: str = "extract",
    verbose: bool = True,
) -> np.ndarray:
    """Features (n, d) of an in-memory array ``x``, in batches, with a progress bar.

    Parameters
    ----------
    encoder : Encoder or nn.Module
    x : (n, ...) array
        uint8 images, float images in [0, 1], or vectors.
    batch_size : int
    device : torch.device
    desc : str
    verbose : bool

    Returns
    -------
    (n, d) float32 array

    Raises
    ------
    ValueError
        NaN or Inf features.
    """
    if not isinstance(encoder, Encoder):
        encoder = Encoder(encoder, None, None, None)
    encoder.to(device)
    out = []
    for start in tqdm(range(0, len(x), batch_size), desc=desc, disable=not verbose, leave=False):
        batch = torch.as_tensor(as_float(x[start : start + batch_size]))
        out.append(_encode(encoder, batch, device).cpu().numpy())
    features = np.concatenate(out)
    if not np.isfinite(features).all():
        raise ValueError("the encoder produced NaN or Inf features")
    return features


# ------------------------------------------------------------------------- streamed extraction
class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on demand (in DataLoader workers) to uint8 (3, size, size).

    Each image is converted to RGB, its shorter side resized (bicubic) to ``size / crop`` and
    the centre ``size x size`` cut out: with ``crop = 0.875`` the 256 -> 224 evaluation
    transform of DINO and TEMI; with ``crop = 1`` a plain resize of square images.

    An item is ``(image, ok, message)``; an unreadable file gives ``ok = False``, a black image
    and the reason, so the caller decides whether to stop or skip.

    Parameters
    ----------
    files : list of Path
    size : int
        Output side.
    crop : float
        In (0, 1].
    """

    def __init__(self, files: list[Path], size: int, crop: float = 0.875):
        if not 0 < crop <= 1:
            raise ValueError(f"crop must be in (0, 1], got {crop}")
        self.files, self.size, self.crop = list(files), int(size), float(crop)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            size = self.size
            if image.size != (size, size) or self.crop < 1.0:
                short = round(size / self.crop)
                w, h = image.size
                scale = short / min(w, h)
                w, h = max(size, round(w * scale)), max(size, round(h * scale))
                image = image.resize((w, h), Image.BICUBIC)
                left, top = (w - size) // 2, (h - size) // 2
                image = image.crop((left, top, left + size, top + size))
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)

    def __getitem__(self, i: int):
        try:
            return torch.from_numpy(self.load(self.files[i]).copy()), True, ""
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
            reason = str(error).split("\n")[0] or type(error).__name__
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, reason


class _Rows(torch.utils.data.Dataset):
    """Rows of an in-memory array as items of the same shape as :class:`ImageFiles`'."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.as_tensor(np.asarray(self.x[i])), True, ""


@dataclass
class _Split:
    source: torch.utils.data.Dataset
    labels: np.ndarray
    names: list[str]


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers: one thread each, the encoder gets the rest


def _read_chunk(path: Path, rows: int, dim: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A written chunk if it is whole (the zip CRC, the shapes, finite values), else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            x, ok = stored["x"], stored["ok"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if len(x) != rows or len(ok) != rows or x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        return None
    if not np.isfinite(x).all():
        return None
    return x, ok


def _write_chunk(path: Path, x: np.ndarray, ok: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, x=x, ok=ok)
    os.replace(tmp, path)  # atomic: a chunk is on disk whole or not at all


def _identity(encoder: Encoder, splits: dict[str, _Split], options: dict) -> dict:
    digest = hashlib.sha1()
    for name, split in splits.items():
        digest.update(name.encode())
        digest.update("\n".join(split.names).encode())
        digest.update(np.ascontiguousarray(split.labels).tobytes())
    return {
        "format": FEATURES_FORMAT,
        "encoder": encoder.name,
        "image_size": encoder.image_size,
        "pooling": encoder.pooling,
        "inputs": digest.hexdigest(),
        **options,
    }


def stream_extract(
    encoder: Encoder,
    splits: dict[str, _Split],
    out: str | Path,
    *,
    classes: list[str],
    has_test_split: bool = True,
    batch_size: int = 256,
    chunk_batches: int = 16,
    num_workers: int | None = None,
    crop: float | None = None,
    skip_corrupt: bool = False,
    device: torch.device,
    verbose: bool = True,
) -> Path:
    """Extract features split by split into the folder ``out``, resumably.

    The images of a split are cut into chunks of ``batch_size * chunk_batches``; chunk ``c`` is
    extracted by rank ``c mod world_size`` (one process: all of them) and written atomically to
    ``out/.chunks/SPLIT-c.npz`` (float16 features and a mask of decoded images). A chunk already
    on disk and whole is kept, so a rerun of an interrupted extraction continues where it
    stopped and, since every chunk is cut into the same batches, gives the same features bit
    for bit. When all chunks exist, rank 0 joins them into ``x_SPLIT.npy`` (float16,
    memory-mapped while written: one chunk in memory at a time), ``y_SPLIT.npy`` and
    ``files_SPLIT.txt``, then writes ``meta.json`` (last: it marks the folder finished) and
    removes the chunks.

    Returns
    -------
    Path
        ``out``.

    Parameters
    ----------
    encoder : Encoder
    splits : dict
        ``train`` / ``test`` to their sources (what ``run_extract`` builds from a spec).
    out : str or Path
        The features folder.
    classes : list of str
    has_test_split : bool
        False when the split was made by the library (recorded for the cluster task).
    batch_size : int
    chunk_batches : int
        Batches per chunk, the unit of resumption.
    num_workers : int, optional
        Decoding processes (default ``min(8, CPUs)``).
    crop : float, optional
        Recorded with the settings (image folders).
    skip_corrupt : bool
        Leave out unreadable images with a warning instead of stopping.
    device : torch.device
    verbose : bool
    """
    from beyond_icon.distributed import world

    out = Path(out).expanduser()
    rank, world_size = world()
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError("batch_size and chunk_batches must be positive integers")
    chunk = batch_size * chunk_batches
    options = {
        "batch_size": batch_size,
        "chunk": chunk,
        "crop": crop,
        # bf16 autocast on CUDA, float32 elsewhere: chunks of both never mix in one table
        "precision": "bfloat16" if device.type == "cuda" else "float32",
    }
    identity = _identity(encoder, splits, options)
    if _open_folder(out, identity, rank):
        if verbose and rank == 0:
            print(f"{out} already holds these features (meta.json); nothing to do")
        return out
    chunks_dir = out / ".chunks"
    todo = _pending_chunks(splits, chunks_dir, chunk, rank, world_size, skip_corrupt)
    remaining = sum(
        min(chunk, len(splits[name].source) - c * chunk) for name in todo for c in todo[name]
    )
    encoder.to(device)
    started = time.perf_counter()
    bar = tqdm(
        total=remaining,
        unit="img",
        desc=f"extract {encoder.name}" + (f" [rank {rank}]" if world_size > 1 else ""),
        disable=not verbose or rank != 0,
        smoothing=0.1,
    )
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    for name, split in splits.items():
        batches = [
            list(range(start, min(start + batch_size, (c + 1) * chunk, len(split.source))))
            for c in todo[name]
            for start in range(c * chunk, min((c + 1) * chunk, len(split.source)), batch_size)
        ]
        if not batches:  # this split is done (or holds no chunk of this rank)
            continue
        loader = torch.utils.data.DataLoader(
            split.source,
            batch_sampler=batches,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
        )
        chunks = _Chunks(chunks_dir, name, chunk, len(split.source))
        for index, (images, ok, reasons) in zip(batches, loader):
            _check_decoded(split, index, ok, reasons, skip_corrupt)
            chunks.add(index, _embed_batch(encoder, images, ok, split, index, device), ok.numpy())
            bar.update(len(index))
    bar.close()
    seconds = time.perf_counter() - started
    if world_size > 1:  # every rank's images of this segment (the barrier of the join too)
        from beyond_icon.distributed import all_reduce_sum

        remaining = int(all_reduce_sum(torch.tensor(remaining, device=device)))
    if rank == 0:
        rate = remaining / seconds if remaining and seconds > 0 else None
        meta = _join(out, chunks_dir, splits, chunk, identity, classes, has_test_split, rate)
        if verbose:
            sizes = ", ".join(f"{k} {v}" for k, v in meta["splits"].items())
            shown = f"; {rate:.0f} img/s" if rate else ""
            skipped = (
                f"; {len(meta['skipped'])} unreadable files skipped" if meta["skipped"] else ""
            )
            print(f"{out}: {sizes} x {meta['dim']} float16 features{shown}{skipped}")
    # no barrier after the join: the other ranks are done, and a long join (ImageNet on a
    # slow disk) must not run into their collective timeout
    return out


def _open_folder(out: Path, identity: dict, rank: int) -> bool:
    """True if ``out`` already holds these finished features. Otherwise make sure its chunks
    were started with the same settings (rank 0 records them on the first run), or refuse."""
    meta_path, chunks_dir = out / "meta.json", out / ".chunks"
    if meta_path.is_file():
        done = json.loads(meta_path.read_text())
        if {k: done.get(k) for k in identity} == identity:
            return True
        changed = sorted(k for k in identity if done.get(k) != identity[k])
        raise ValueError(
            f"{out} already holds features made with other settings ({', '.join(changed)} "
            "differ, meta.json); choose another --out or delete it"
        )
    manifest = chunks_dir / "manifest.json"
    if rank == 0:
        chunks_dir.mkdir(parents=True, exist_ok=True)
        # no chunk on disk yet (a first run that stopped on a bad option or encoder): nothing
        # to mix, so these settings start the folder
        if not manifest.is_file() or not any(chunks_dir.glob("*.npz")):
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps(identity, indent=1))
            os.replace(tmp, manifest)
    _barrier()
    try:
        started_with = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        started_with = {}
    if started_with != identity:  # every rank reaches the same verdict
        changed = sorted(k for k in identity if started_with.get(k) != identity[k])
        raise ValueError(
            f"{out} holds an interrupted extraction with other settings ({', '.join(changed)} "
            "differ); rerun it with the same options, or choose another --out"
        )
    return False


def _pending_chunks(
    splits, chunks_dir: Path, chunk: int, rank: int, world_size: int, skip_corrupt: bool
) -> dict:
    """This rank's chunks (every ``world_size``-th) that are not on disk whole, per split. A
    kept chunk that left out unreadable images (an earlier ``--skip-corrupt`` run) is refused
    without ``skip_corrupt``, naming the first such file."""
    todo: dict[str, list[int]] = {}
    for name, split in splits.items():
        n = len(split.source)
        todo[name] = []
        for c in range(rank, -(-n // chunk), world_size):
            stored = _read_chunk(
                chunks_dir / f"{name}-{c:06d}.npz", min(chunk, n - c * chunk), None
            )
            if stored is None:
                todo[name].append(c)
            elif not skip_corrupt and not stored[1].all():
                first = split.names[c * chunk + int(np.flatnonzero(~stored[1])[0])]
                raise ValueError(
                    f"{first}: cannot decode the image (left out by an earlier --skip-corrupt "
                    "run into this folder); pass --skip-corrupt again or choose another --out"
                )
    return todo


def _check_decoded(split, index: list[int], ok: Tensor, reasons, skip_corrupt: bool) -> None:
    """An unreadable image stops the run naming the file, or is skipped with a warning."""
    for i in np.flatnonzero(~ok.numpy()):
        path = split.names[index[i]]
        if not skip_corrupt:
            raise ValueError(
                f"{path}: cannot decode the image ({reasons[i]}); pass --skip-corrupt to leave "
                "such files out"
            )
        warnings.warn(f"skipped {path}: {reasons[i]}", stacklevel=3)


def _encode(encoder: Encoder, images: Tensor, device: torch.device) -> Tensor:
    """float32 features of a batch, the encoder under bf16 autocast on CUDA."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return encoder.embed(images.to(device, non_blocking=True)).float()


def _embed_batch(encoder, images, ok, split, index, device) -> np.ndarray:
    """float16 features of a decoded batch (zeros for the images that did not decode)."""
    features = _encode(encoder, images, device)
    if not bool(torch.isfinite(features[ok.to(device)]).all()):
        raise ValueError(
            f"the encoder produced NaN or Inf features for {split.names[index[0]]} .. "
            f"{split.names[index[-1]]}"
        )
    features = features.clamp(-65504, 65504).half().cpu().numpy()
    features[~ok.numpy()] = 0
    return features


class _Chunks:
    """Collects a split's batches and writes each chunk when its last batch arrives."""

    def __init__(self, folder: Path, name: str, chunk: int, n: int):
        self.folder, self.name, self.chunk, self.n = folder, name, chunk, n
        self.parts: list[np.ndarray] = []
        self.oks: list[np.ndarray] = []
        self.dim: int | None = None

    def add(self, index: list[int], features: np.ndarray, ok: np.ndarray) -> None:
        self.parts.append(features)
        self.oks.append(ok)
        c = index[0] // self.chunk
        if index[-1] + 1 == min((c + 1) * self.chunk, self.n):  # the chunk's last batch
            x = np.concatenate(self.parts)
            if self.dim is not None and x.shape[1] != self.dim:
                raise ValueError("the encoder's feature dimension changed between batches")
            self.dim = x.shape[1]
            _write_chunk(self.folder / f"{self.name}-{c:06d}.npz", x, np.concatenate(self.oks))
            self.parts, self.oks = [], []


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _join(out, chunks_dir, splits, chunk, identity, classes, has_test_split, rate) -> dict:
    """Concatenate the chunks of every split into memory-mapped arrays; write meta.json last."""
    sizes, skipped, dim = {}, [], None
    for name, split in splits.items():
        n = len(split.source)
        n_chunks = -(-n // chunk)
        masks = []
        for c in range(n_chunks):
            rows = min(chunk, n - c * chunk)
            stored = _read_chunk(chunks_dir / f"{name}-{c:06d}.npz", rows, dim)
            if stored is None:
                raise RuntimeError(f"chunk {c} of {name} is missing or damaged; rerun to redo it")
            dim = stored[0].shape[1]
            masks.append(stored[1])
        keep = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
        skipped += [split.names[i] for i in np.flatnonzero(~keep)]
        n_ok = int(keep.sum())
        target = np.lib.format.open_memmap(
            out / f"x_{name}.npy", mode="w+", dtype=np.float16, shape=(n_ok, dim or 0)
        )
        row = 0
        for c in range(n_chunks):
            x, ok = _read_chunk(chunks_dir / f"{name}-{c:06d}.npz", len(masks[c]), dim)
            target[row : row + int(ok.sum())] = x[ok]
            row += int(ok.sum())
        target.flush()
        del target
        np.save(out / f"y_{name}.npy", split.labels[keep].astype(np.int64))
        (out / f"files_{name}.txt").write_text(
            "".join(f"{split.names[i]}\n" for i in np.flatnonzero(keep))
        )
        sizes[name] = n_ok
    meta = {
        **identity,
        "dim": dim,
        "dtype": "float16",
        "splits": sizes,
        "classes": list(classes),
        "has_test_split": has_test_split,
        "skipped": skipped,
        "images_per_second": rate,  # of the last (or only) segment of the extraction
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    shutil.rmtree(chunks_dir, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------------- the command
def _sources(spec: str, encoder: Encoder, crop: float, data_dir, download):
    """The splits of ``spec`` as decodable sources: image files stream, anything else is in
    memory already."""
    kind, _, arg = spec.partition(":")
    if kind.strip().lower() == "imagefolder" and arg:
        files = list_imagefolder(arg)
        if encoder.image_size is None:
            encoder.image_size = 224  # a batch needs one size; the named encoders set theirs
        splits = {
            name: _Split(
                ImageFiles(paths, encoder.image_size, crop),
                labels,
                [str(p.relative_to(files.root)) for p in paths],
            )
            for name, (paths, labels) in files.splits.items()
        }
        return splits, files.classes, files.has_test_split
    dataset = data_registry.load(spec, data_dir=data_dir, download=download)
    splits = {
        name: _Split(
            _Rows(getattr(dataset, f"x_{name}")),
            getattr(dataset, f"y_{name}"),
            [str(i) for i in range(len(getattr(dataset, f"y_{name}")))],
        )
        for name in ("train", "test")
    }
    return splits, dataset.classes, dataset.has_test_split


def _load_in_turn(name: str, image_size: int | None, pooling: str) -> Encoder:
    """Under torchrun rank 0 loads first (and fills the torch.hub cache), then the others read
    the cache: ranks unpacking the same repository at once can collide."""
    from beyond_icon.distributed import world

    rank, world_size = world()
    if world_size > 1 and rank != 0:
        _barrier()
    encoder = load_encoder(name, image_size, pooling)
    if world_size > 1 and rank == 0:
        _barrier()
    return encoder


def run_extract(
    encoder_name: str,
    spec: str,
    out: str | Path,
    *,
    data_dir=None,
    download=False,
    batch_size: int = 256,
    device: str = "auto",
    image_size: int | None = None,
    pooling: str = "cls",
    crop: float = 0.875,
    num_workers: int | None = None,
    chunk_batches: int = 16,
    skip_corrupt: bool = False,
    verbose: bool = True,
) -> Path:
    """``beyond-icon extract``: a streamed features folder, or one .npz decoded in memory.

    Parameters
    ----------
    encoder_name : str
        See :func:`load_encoder`.
    spec : str
        A dataset spec; ``imagefolder:PATH`` streams from the files.
    out : str or Path
        A features folder, or ``FILE.npz`` for the in-memory path.
    data_dir, download
        As in :func:`beyond_icon.data.load`.
    batch_size, num_workers, chunk_batches, skip_corrupt
        As in :func:`stream_extract`.
    device : str
    image_size : int, optional
    pooling : {"cls", "mean"}
    crop : float
        Shorter side resized to ``image_size / crop``, then the centre cut out.
    verbose : bool

    Returns
    -------
    Path
        ``out``.
    """
    from beyond_icon.distributed import init_from_env

    dev = resolve_device(device)
    out = Path(out).expanduser()
    streamed = out.suffix.lower() != ".npz"
    if streamed:
        init_from_env(dev)
    encoder = _load_in_turn(encoder_name, image_size, pooling)
    if streamed:
        splits, classes, has_test = _sources(spec, encoder, crop, data_dir, download)
        return stream_extract(
            encoder,
            splits,
            out,
            classes=classes,
            has_test_split=has_test,
            batch_size=batch_size,
            chunk_batches=chunk_batches,
            num_workers=num_workers,
            crop=crop if spec.lower().startswith("imagefolder:") else None,
            skip_corrupt=skip_corrupt,
            device=dev,
            verbose=verbose,
        )
    dataset = data_registry.load(spec, data_dir=data_dir, download=download)
    started = time.perf_counter()
    train = extract(
        encoder, dataset.x_train, batch_size=batch_size, device=dev, desc="train", verbose=verbose
    )
    test = extract(
        encoder, dataset.x_test, batch_size=batch_size, device=dev, desc="test", verbose=verbose
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(
        tmp,
        x_train=train,
        y_train=dataset.y_train,
        x_test=test,
        y_test=dataset.y_test,
        classes=np.asarray(dataset.classes),
    )
    tmp.replace(out)
    if verbose:
        print(
            f"{dataset.describe()} -> {train.shape[1]}-d features in "
            f"{time.perf_counter() - started:.1f} s: {out}"
        )
    return out
