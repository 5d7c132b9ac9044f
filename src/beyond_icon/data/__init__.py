"""Datasets (a registry of specs), the IDX reader, and batch augmentations."""

from beyond_icon.data.datasets import DATA_ENV, Dataset, as_float, fingerprint, load, spec_names
from beyond_icon.data.idx import read_idx, write_idx

__all__ = [
    "DATA_ENV",
    "Dataset",
    "as_float",
    "fingerprint",
    "load",
    "read_idx",
    "spec_names",
    "write_idx",
]
