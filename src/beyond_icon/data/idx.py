"""Reader and writer for the IDX format of MNIST and Fashion-MNIST (optionally gzipped)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file: magic (0, 0, dtype code, ndim), ndim big-endian sizes, then the data."""
    path = Path(path)
    with _open(path) as handle:
        header = handle.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _DTYPES:
            raise ValueError(f"{path} is not an IDX file (magic bytes {header!r})")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        dtype = np.dtype(_DTYPES[header[2]])
        data = handle.read()
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data, found {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if the name ends in .gz)."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    big_endian = array.astype(np.dtype(_DTYPES[codes[dtype]]))
    header = bytes([0, 0, codes[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + big_endian.tobytes())
