"""Nearest neighbours of every point: exact in blocks, or approximate, with an on-disk cache.

The exact search keeps memory at O(query_block x key_block + query_block x k) whatever the
number of points: each block of queries is compared with the keys one block at a time and a
running top-k is merged. ImageNet scale (1.28M x 768) fits on one GPU this way. On the CPU,
beyond a few hundred thousand points, the approximate backend (``pynndescent``, when
installed) is faster by orders of magnitude.

The cache lives beside the data (or in ``~/.cache/beyond-icon``), is keyed by the data's
fingerprint, the metric and ``k``, is written atomically and checked on load: a truncated or
foreign file is rebuilt with a warning, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["METHODS", "METRICS", "cached_neighbor_table", "cached_neighbors", "mine_neighbors"]

METRICS = ("cosine", "euclidean")
METHODS = ("auto", "exact", "nndescent")
# "auto" searches exactly up to this many points on the CPU (about a minute on 2 cores at 200k
# x 50 dimensions), approximately beyond it when pynndescent is installed.
EXACT_LIMIT = 200_000
TIE_MARGIN = 16
"""Extra candidates per block of the exact search, so that ties at the k-th neighbour (duplicate
points) resolve to the lowest indices whatever k is; a row tied beyond it is searched again over
its whole tie (:func:`_widen_ties`)."""


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of ``x`` (a read-only memory map is viewed, not copied)."""
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    with warnings.catch_warnings():  # read-only memory maps: never written through
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(x)


def _check_k(k: object, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise ValueError(
            f"n_neighbors must be an integer in [1, {n - 1}] for {n} points, got {k!r}"
        )
    return int(k)


@torch.no_grad()
def mine_neighbors(
    x: np.ndarray | torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    query_block: int = 4096,
    key_block: int = 65536,
    device: str | torch.device = "cpu",
    verbose: bool = False,
    queries: slice | None = None,
    return_distances: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other points of each point, exactly, nearest first.

    Parameters
    ----------
    x : (n, d) array or tensor
        The points.
    k : int
        Neighbours per point, ``1 <= k <= n - 1``.
    metric : {"cosine", "euclidean"}
        Cosine similarity (largest first) or Euclidean distance (smallest first).
    query_block, key_block : int
        Block sizes of the search; memory is O(query_block x key_block).
    device : str or torch.device
        Where the search runs.
    verbose : bool
        Show a progress bar.
    queries : slice, optional
        Search only for this contiguous range of points (their rows only are returned; an
        empty range gives a (0, k) table).
    return_distances : bool
        Also return the squared Euclidean distances (``metric="euclidean"``) or the cosine
        similarities (``metric="cosine"``) of the neighbours.

    Returns
    -------
    indices : (n, k) int64 array
        Self matches are excluded; exact ties (duplicate points) go to the lower index, so
        the table for k is the first k columns of the table for any larger k.
    values : (n, k) float32 array
        Only with ``return_distances``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    features = _as_tensor(x)
    if features.dim() != 2:
        raise ValueError(f"embeddings must be (n, d), got {tuple(features.shape)}")
    n = features.shape[0]
    k = _check_k(k, n)
    device = torch.device(device)
    # the points stay in their dtype (a float16 table is never copied whole to float32); each
    # block is made float32 and normalised (cosine) or centred (euclidean) when it is used
    raw = features.to(device)
    shift = torch.zeros(1, raw.shape[1], device=device)
    total = torch.zeros(raw.shape[1], dtype=torch.float64, device=device)
    scale = torch.empty(n, device=device)  # row norms (cosine) or squared norms (euclidean)
    for start in range(0, n, key_block):  # one pass: finiteness, and norms or sums
        block = raw[start : start + key_block].float()
        if not bool(torch.isfinite(block).all()):
            raise ValueError("embeddings contain NaN or Inf")
        if metric == "cosine":
            scale[start : start + len(block)] = block.norm(dim=1).clamp_min(1e-12)
        else:
            total += block.sum(0, dtype=torch.float64)
    if metric == "euclidean":  # centre: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b cancels less
        shift = (total / max(n, 1)).float()[None]
        for start in range(0, n, key_block):  # the squared norms need the centre first
            block = raw[start : start + key_block].float()
            scale[start : start + len(block)] = (block - shift).pow(2).sum(1)

    def rows_of(start: int, stop: int) -> torch.Tensor:
        block = raw[start:stop].float()
        if metric == "cosine":
            return block / scale[start:stop, None]
        return block - shift

    key_sq = scale
    first, last = 0, n
    if queries is not None:
        if not isinstance(queries, slice) or queries.step not in (None, 1):
            raise ValueError(f"queries must be a contiguous slice, got {queries!r}")
        first, last, _ = queries.indices(n)
        if first > last:  # an empty share (a rank of a small sharded search) is fine
            raise ValueError(f"queries {queries!r} runs backwards over {n} points")
    out = torch.empty(last - first, k, dtype=torch.long)
    out_values = torch.empty(last - first, k, dtype=torch.float32)
    # one buffer for every block of similarities: a fresh (4096 x 60k) float32 matrix per block
    # is a new mapping filled page by page, which made the CPU matmul take twice as long
    # (Fashion-MNIST 60k: 0.39 -> 0.20 s a block)
    buffer = torch.empty(min(query_block, last - first) * min(key_block, n), device=device)
    for start in tqdm(
        range(first, last, query_block), desc="mining neighbours", disable=not verbose, leave=False
    ):
        query = rows_of(start, min(start + query_block, last))
        rows = torch.arange(start, start + len(query), device=device)
        best_sim = torch.full((len(query), k), -float("inf"), device=device)
        best_idx = torch.zeros((len(query), k), dtype=torch.long, device=device)
        for key_start in range(0, n, key_block):
            block = rows_of(key_start, min(key_start + key_block, n))
            sims = buffer[: len(query) * len(block)].view(len(query), len(block))
            if metric == "euclidean":  # larger is nearer: -|b|^2 + 2 a.b (|a|^2 is per row),
                # one matmul with the norms as its bias (a pass over the block saved)
                key_norms = key_sq[key_start : key_start + len(block)][None, :]
                torch.addmm(key_norms, query, block.T, beta=-1.0, alpha=2.0, out=sims)
            else:
                torch.mm(query, block.T, out=sims)
            cols = torch.arange(key_start, key_start + len(block), device=device)
            # the self matches lie on one diagonal of the block: O(block) to write, where a
            # boolean mask costs two passes over it (empty when the block holds none)
            sims.diagonal(offset=start - key_start).fill_(-float("inf"))
            # TIE_MARGIN more than needed, so that points tied at the k-th similarity (duplicates)
            # are all candidates and the lowest indices win, whatever k is; unsorted, since
            # the merge below orders them (topk alone on a 4,096 x 60k block of random data: 0.36 ->
            # 0.26 s; the whole search of Fashion-MNIST 60k, k = 90: 12 -> 11 s)
            top_sim, top_pos = sims.topk(min(k + TIE_MARGIN, len(block)), dim=1, sorted=False)
            if top_sim.shape[1] < len(block):
                _widen_ties(sims, top_sim, top_pos, k)
            merged_sim = torch.cat([best_sim, top_sim], dim=1)
            merged_idx = torch.cat([best_idx, cols[top_pos]], dim=1)
            # higher similarity first, ties by lower index: a table for k is the first k
            # columns of the table for any larger k (the cache reuses larger tables)
            by_index = merged_idx.argsort(dim=1)
            merged_sim, merged_idx = merged_sim.gather(1, by_index), merged_idx.gather(1, by_index)
            order = merged_sim.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_sim, best_idx = merged_sim.gather(1, order), merged_idx.gather(1, order)
        if metric == "euclidean":
            best_sim = (key_sq[rows][:, None] - best_sim).clamp_min(0.0)
        out[start - first : start - first + len(query)] = best_idx.cpu()
        out_values[start - first : start - first + len(query)] = best_sim.cpu()
    if return_distances:
        return out.numpy(), out_values.numpy()
    return out.numpy()


def _widen_ties(sims: torch.Tensor, top_sim: torch.Tensor, top_pos: torch.Tensor, k: int) -> None:
    """Rows whose k-th similarity is tied with more columns than the margin holds (many
    duplicates) get, in place, their candidates by (similarity, then lowest index): without it
    ``topk`` keeps an arbitrary subset of the tie, and a table for k would differ from the first
    k columns of a table for a larger k (which the cache reuses). A stable sort of such a row's
    whole block, 64 rows at a time; no row is sorted when none is tied that widely."""
    kth = top_sim.topk(min(k, top_sim.shape[1]), dim=1).values[:, -1]
    tied = (top_sim.min(dim=1).values == kth).nonzero().flatten()
    for chunk in tied.split(64):  # empty when no row is tied beyond the margin
        order = sims[chunk].argsort(dim=1, descending=True, stable=True)[:, : top_pos.shape[1]]
        top_pos[chunk], top_sim[chunk] = order, sims[chunk].gather(1, order)


def _nndescent(x: np.ndarray, k: int, metric: str, seed: int, verbose: bool):
    """Approximate neighbours with pynndescent (the backend of UMAP)."""
    try:
        from pynndescent import NNDescent
    except ImportError:
        raise ImportError(
            "the approximate neighbour search needs pynndescent: pip install pynndescent "
            "(or use the exact search, method='exact')"
        ) from None
    index = NNDescent(x, metric=metric, n_neighbors=k + 1, random_state=seed, verbose=verbose)
    indices, distances = index.neighbor_graph
    # drop each point's self match (usually the first column; not always when duplicates exist)
    keep = indices != np.arange(len(x))[:, None]
    keep[keep.sum(1) > k, -1] = False  # the self match was not found: drop the farthest
    indices = indices[keep].reshape(len(x), k).astype(np.int64)
    distances = distances[keep].reshape(len(x), k).astype(np.float32)
    values = distances**2 if metric == "euclidean" else 1.0 - distances
    return indices, values


def resolve_method(method: str, n: int, device: str | torch.device = "cpu") -> str:
    """``auto``: the exact search up to 200k points or on a GPU, else pynndescent if installed."""
    if method not in METHODS:
        raise ValueError(f"neighbor_method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if n <= EXACT_LIMIT or torch.device(device).type == "cuda":
        return "exact"
    try:
        import pynndescent  # noqa: F401
    except ImportError:
        warnings.warn(
            f"{n} points: the exact neighbour search will be slow on the CPU; "
            "pip install pynndescent for the approximate one",
            stacklevel=3,
        )
        return "exact"
    return "nndescent"


def _fingerprint(x: np.ndarray) -> str:
    digest = hashlib.sha1()
    digest.update(str((x.shape, x.dtype.str)).encode())
    digest.update(np.ascontiguousarray(x).view(np.uint8).data)
    return digest.hexdigest()[:16]


def _load_table(path: Path, n: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A cached table cut to ``k`` columns, or None (with a warning) if the file is bad."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            indices, values = stored["indices"], stored["values"]
        ok = (
            indices.ndim == 2
            and indices.shape == values.shape
            and indices.shape[0] == n
            and indices.shape[1] >= k
            and indices.dtype.kind == "i"
            and values.dtype.kind == "f"
            and (indices.size == 0 or (indices.min() >= 0 and indices.max() < n))
            and bool(np.isfinite(values).all())
        )
    except Exception:  # a truncated zip, a missing key, a foreign file
        ok = False
    if not ok:
        warnings.warn(f"ignoring a damaged neighbour cache {path}; it is rebuilt", stacklevel=3)
        return None
    return indices[:, :k].astype(np.int64), values[:, :k].astype(np.float32)


def cached_neighbor_table(
    x: np.ndarray,
    k: int,
    cache_dir: str | Path | None = None,
    *,
    metric: str = "cosine",
    method: str = "auto",
    device: str | torch.device = "cpu",
    verbose: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Neighbour indices and distances of every point, from the cache or searched and cached.

    Parameters
    ----------
    x : (n, d) array
        The points.
    k : int
        Neighbours per point.
    cache_dir : path, optional
        Where the table is cached (default ``~/.cache/beyond-icon``); the file is
        ``knn-v2-<fingerprint>-<metric>-k<k>.npz``. A cached exact table for a larger ``k`` is
        reused by truncation (ties are ordered by index, so it is the table for ``k``). A read-only place is tolerated: the table is returned uncached.
    metric : {"cosine", "euclidean"}
        See :func:`mine_neighbors`.
    method : {"auto", "exact", "nndescent"}
        Exact blocked search, or pynndescent's approximate one; ``auto`` picks exact up to
        200,000 points or on a GPU.
    device, verbose, seed
        Where the exact search runs, a progress bar, the approximate search's seed.

    Returns
    -------
    indices : (n, k) int64 array
    values : (n, k) float32 array
        Squared Euclidean distances or cosine similarities (see :func:`mine_neighbors`).
    from_cache : bool
    """
    x = np.asarray(x)
    if x.dtype != np.float16:  # a float16 table (an extract folder) stays float16, memory-mapped
        x = x.astype(np.float32, copy=False)
    n = len(x)
    k = _check_k(k, n)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    method = resolve_method(method, n, device)
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "beyond-icon"
    # v2: exact tables order ties by index (see _widen_ties), so a larger table cut to k is the
    # table for k; tables from before may not be, and are not read
    key = f"knn-v2-{_fingerprint(x)}-{metric}{'-approx' if method == 'nndescent' else ''}"
    from beyond_icon.distributed import world

    rank, world_size = world()
    if world_size > 1:  # rank 0 decides and shares: every rank must hold the same table
        return _distributed_table(x, k, cache, key, metric, method, device, verbose, seed)
    table = _lookup(cache, key, n, k)
    if table is not None:
        return (*table, True)
    if method == "nndescent":
        indices, values = _nndescent(x, k, metric, seed, verbose)
    else:
        indices, values = mine_neighbors(
            x, k, metric=metric, device=device, verbose=verbose, return_distances=True
        )
    _store(cache, key, k, indices, values)
    return indices, values, False


def _lookup(cache: Path, key: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached table for exactly ``k``, else (exact tables) the smallest larger one cut to
    ``k``. An approximate table for a larger k is not the search for k, so it is not reused:
    a run's neighbours do not depend on which runs came before it."""
    stored = []
    for found in cache.glob(f"{key}-k*.npz") if cache.is_dir() else []:
        stored_k = found.name[len(key) + 2 : -len(".npz")]
        if not stored_k.isdigit():
            continue
        if int(stored_k) == k or (int(stored_k) > k and not key.endswith("-approx")):
            stored.append((int(stored_k), found))
    for _, found in sorted(stored):  # numerically: "k100" sorted before "k50" as text
        table = _load_table(found, n, k)
        if table is not None:
            return table
    return None


def _store(cache: Path, key: str, k: int, indices: np.ndarray, values: np.ndarray) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{key}-k{k}.{os.getpid()}.tmp.npz"  # never matches the lookup's glob
        np.savez(tmp, indices=indices, values=values)
        tmp.replace(cache / f"{key}-k{k}.npz")
    except OSError:
        pass  # a read-only place: the neighbours are still returned


def _distributed_table(x, k, cache, key, metric, method, device, verbose, seed):
    """Rank 0 looks the table up (or runs the approximate search) and broadcasts it; the exact
    search is sharded: each rank mines a contiguous share of the queries, all gather them."""
    import torch.distributed as dist

    from beyond_icon.distributed import gather_rows, world

    rank, world_size = world()
    n = len(x)
    device = torch.device(device)
    table = _lookup(cache, key, n, k) if rank == 0 else None
    looked_up = table is not None
    if method == "nndescent" and rank == 0 and table is None:
        table = _nndescent(x, k, metric, seed, verbose)
        _store(cache, key, k, *table)
    flags = torch.tensor([table is not None, looked_up], dtype=torch.int64, device=device)
    dist.broadcast(flags, 0)
    if bool(flags[0].item()):
        indices = torch.as_tensor(table[0]) if rank == 0 else torch.empty(n, k, dtype=torch.long)
        values = torch.as_tensor(table[1]) if rank == 0 else torch.empty(n, k)
        indices, values = indices.to(device), values.to(device)
        dist.broadcast(indices, 0)
        dist.broadcast(values, 0)
        return indices.cpu().numpy(), values.cpu().numpy(), bool(flags[1].item())
    bounds = np.linspace(0, n, world_size + 1).astype(int)
    share = slice(bounds[rank], bounds[rank + 1])
    mine, mine_values = mine_neighbors(
        x, k, metric=metric, device=device, verbose=verbose, queries=share, return_distances=True
    )
    sizes = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    indices = gather_rows(torch.as_tensor(mine).to(device), sizes).cpu().numpy()
    values = gather_rows(torch.as_tensor(mine_values).to(device), sizes).cpu().numpy()
    if rank == 0:
        _store(cache, key, k, indices, values)
    return indices, values, False


def cached_neighbors(
    x: np.ndarray,
    k: int,
    cache_dir: str | Path | None = None,
    *,
    metric: str = "cosine",
    method: str = "exact",
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> tuple[np.ndarray, bool]:
    """:func:`cached_neighbor_table` without the distances: (indices, whether cached).

    Parameters
    ----------
    x, k, cache_dir, metric, method, device, verbose
        As in :func:`cached_neighbor_table`.

    Returns
    -------
    indices : (n, k) int64 array
    from_cache : bool
    """
    indices, _, from_cache = cached_neighbor_table(
        x, k, cache_dir, metric=metric, method=method, device=device, verbose=verbose
    )
    return indices, from_cache
