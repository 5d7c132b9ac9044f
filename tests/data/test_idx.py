"""The IDX reader and writer (MNIST / Fashion-MNIST files)."""

from __future__ import annotations

import numpy as np
import pytest

from beyond_icon.data import read_idx, write_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) * 7 % 251).astype(dtype).reshape(2, 3, 4)
    write_idx(tmp_path / f"a.idx{suffix}", array)
    back = read_idx(tmp_path / f"a.idx{suffix}")
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_idx_reader_bytes_by_hand(tmp_path):
    """A file written byte by byte per the IDX spec: magic 0 0 8 1, size 3, data."""
    (tmp_path / "labels.idx").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 5, 6, 7]))
    assert read_idx(tmp_path / "labels.idx").tolist() == [5, 6, 7]
    (tmp_path / "short.idx").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 5]))
    with pytest.raises(ValueError, match="promises 9 bytes"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "bad.idx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
