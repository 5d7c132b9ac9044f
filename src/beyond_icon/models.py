"""Backbones and heads in plain torch: MLP, small CNN, CIFAR-stem ResNet-18/50, projection and
cluster heads. Every backbone maps an input batch to (n, feature_dim) features."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beyond_icon._validation import is_int, under_torch_func

__all__ = [
    "BACKBONES",
    "CellMLP",
    "ClusterHead",
    "MLP",
    "ProjectionHead",
    "ResNet",
    "SmallCNN",
    "Standardize",
    "build_backbone",
    "cell_directions",
    "resnet18",
    "resnet50",
]


class Standardize(nn.Module):
    """``(x - mean) / std`` with per-feature (vectors) or per-channel (images) statistics.

    Parameters
    ----------
    mean, std : tensors
        Broadcastable to the inputs; ``std`` is clamped at 1e-6.
    """

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp_min(1e-6))

    @classmethod
    def fit(cls, x: Tensor) -> Standardize:
        """Statistics of a float batch (N, D) or (N, C, H, W)."""
        if x.dim() == 4:
            mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
            std = x.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
        else:
            x = x.flatten(1)
            mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
        return cls(mean, std)

    @classmethod
    def fit_rows(cls, x: np.ndarray | Tensor, block: int = 65536) -> Standardize:
        """Per-feature statistics of (N, D) rows, accumulated in float64 over blocks of rows,
        so that a memory-mapped float16 table is never copied whole."""
        n = len(x)
        if n < 2:
            raise ValueError(f"standardisation needs at least 2 rows, got {n}")
        total = sq = None
        for start in range(0, n, block):
            rows = torch.from_numpy(np.asarray(x[start : start + block], dtype=np.float64))
            rows = rows.reshape(len(rows), -1)
            total = rows.sum(0) if total is None else total + rows.sum(0)
        mean = total / n
        for start in range(0, n, block):
            rows = torch.from_numpy(np.asarray(x[start : start + block], dtype=np.float64))
            part = (rows.reshape(len(rows), -1) - mean).pow(2).sum(0)
            sq = part if sq is None else sq + part
        return cls(mean[None].float(), (sq / (n - 1)).sqrt()[None].float())

    def forward(self, x: Tensor) -> Tensor:
        if self.mean.dim() == 2:
            x = x.flatten(1)
        return (x - self.mean) / self.std


class L2Normalize(nn.Module):
    """Each row scaled to unit Euclidean norm (flattened first)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x.flatten(1), dim=1)


class MLP(nn.Module):
    """Linear -> BatchNorm -> ReLU blocks (``batch_norm=False``: Linear -> ReLU);
    ``feature_dim`` is the last hidden width.

    Parameters
    ----------
    in_dim : int
    hidden : tuple of int
        Widths of the hidden layers.
    batch_norm : bool
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (512, 512), batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            norm = [nn.BatchNorm1d(h)] if batch_norm else []
            layers += [nn.Linear(width, h), *norm, nn.ReLU(inplace=True)]
            width = h
        self.net = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def _opaque_to_numpy(x: Tensor) -> bool:
    """Whether ``x`` must stay in torch ops: traced, compiled or under a ``torch.func``
    transform, where a detour through numpy would be frozen into a constant or fail."""
    compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(
        torch.jit.is_tracing() or (compiling is not None and compiling()) or under_torch_func(x)
    )


def coarse_index(landmarks: Tensor, groups: int, candidates: int) -> tuple[Tensor, Tensor]:
    """Groups of landmarks for a two-level lookup: ``groups`` k-means centres of the
    landmarks, and for each centre the landmarks it may hand a point to.

    A centre's list holds every landmark of its k-means group, then its nearest other
    landmarks up to ``candidates`` (more when a group is larger), in increasing index order.

    Parameters
    ----------
    landmarks : (m, d) tensor
    groups : int
        ``G``, with ``2 <= G < m``.
    candidates : int
        ``K``, the least length of a list, with ``1 <= K <= m``.

    Returns
    -------
    centres : (G, d) float32 tensor
    lists : (G, K') int64 tensor, ``K' >= K``, each row sorted.
    """
    m = len(landmarks)
    if not 2 <= groups < m or not 1 <= candidates <= m:
        raise ValueError(
            f"a coarse index needs 2 <= groups < m and 1 <= candidates <= m; got groups = "
            f"{groups}, candidates = {candidates} for m = {m} landmarks"
        )
    points = landmarks.detach().float().cpu()
    generator = torch.Generator().manual_seed(0)  # a fixed function of the landmarks
    centres = points[torch.randperm(m, generator=generator)[:groups]].clone()
    for _ in range(25):  # Lloyd; a group left empty keeps its centre
        assign = torch.cdist(points, centres).argmin(1)
        counts = torch.bincount(assign, minlength=groups)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        filled = counts > 0
        moved = sums[filled] / counts[filled, None]
        if torch.equal(moved, centres[filled]):
            break
        centres[filled] = moved
    distances = torch.cdist(centres, points)
    assign = distances.argmin(0)
    width = max(candidates, int(torch.bincount(assign, minlength=groups).max()))
    distances[assign, torch.arange(m)] = -1.0  # a group's own landmarks first
    lists = distances.topk(width, dim=1, largest=False).indices.sort(1).values
    return centres.to(landmarks.device), lists.to(landmarks.device)


@torch.no_grad()
def cell_directions(inputs: Tensor, cells: Tensor, landmarks: Tensor, dims: int) -> Tensor:
    """Each cell's own principal directions: the top right singular vectors of its training
    points' offsets from its landmark.

    ``U_c`` holds the first ``dims`` rows of ``V^T`` in ``X_c - mu_c = U S V^T``, where ``X_c``
    are the rows of ``inputs`` in cell ``c``; a cell with fewer than 2 points, or fewer than
    ``dims``, has zero rows beyond them (no direction to map along).

    Parameters
    ----------
    inputs : (n, d) tensor
        The training inputs.
    cells : (n,) integer tensor
        The cell of each row.
    landmarks : (m, d) tensor
        ``mu_c``.
    dims : int
        Directions per cell.

    Returns
    -------
    (m, dims, d) float32 tensor
    """
    m, d = landmarks.shape
    inputs, landmarks = inputs.float().cpu(), landmarks.float().cpu()
    cells = cells.cpu()
    bases = torch.zeros(m, dims, d)
    order = torch.argsort(cells)
    counts = torch.bincount(cells, minlength=m)
    starts = torch.cumsum(counts, 0) - counts
    for cell in torch.nonzero(counts >= 2).flatten().tolist():
        members = order[starts[cell] : starts[cell] + counts[cell]]
        top = torch.linalg.svd(inputs[members] - landmarks[cell], full_matrices=False).Vh[:dims]
        bases[cell, : len(top)] = top
    return bases


class CellMLP(MLP):
    """An :class:`MLP` whose first layer also adds a learned vector for the cell of the input:
    the nearest of ``m`` fixed landmarks (the k-means centroids of the training inputs).

    ``h_1 = relu(W x + b + s e_{c(x)})``, ``c(x) = argmin_l |x - mu_l|`` (from 1,024 landmarks
    the argmin over the list of the nearest coarse centre, see ``coarse``), then the MLP's
    other layers. It is an MLP on ``[x, s onehot(c(x))]`` whose one-hot columns start at zero,
    so it starts as the plain MLP: the one-hot part lets the map jump between cells, which a
    ReLU network of the inputs alone, smooth in ``x``, learns slowly, while inside a cell it
    is as smooth as the MLP. With ``local_dims`` the output also adds the cell's own linear map
    of ``x - mu_{c(x)}`` along the cell's principal directions, which also starts at zero, so
    that each cell can order its own points. The cell of a point is looked up in one matmul with
    the landmarks (from 1,024 landmarks, one with the coarse centres and one with a list), so it
    stays a single forward pass. Under Adam, ``s`` sets how fast the cells' vectors move against
    the weights'.

    Parameters
    ----------
    in_dim : int
    landmarks : (m, in_dim) tensor
        Fixed cell centres (a buffer, saved with the state dict), ``m >= 2``.
    hidden : tuple of int
    batch_norm : bool
    offset_scale : float, optional
        ``s``; default ``0.2 sqrt(m)``. On Fashion-MNIST 10k with ParametricSNE (2,000
        cells), ``sqrt(m)`` and random starting vectors tore TV's test embedding into islands
        (trustworthiness 0.923 against 0.986 with the default; KL 0.990 against 0.989).
    coarse : int, optional
        ``G``: with ``G > 0`` the cell is looked up in two levels (:func:`coarse_index`):
        ``c(x)`` is the nearest landmark of ``x`` among the list of its nearest of ``G``
        centres, ``x``'s nearest landmark overall for most points, and the cell of every
        point, in training as in ``transform``, so one function throughout. Default (None):
        ``COARSE`` (64) from ``TWO_LEVEL_FROM`` (1,024) landmarks, else 0 (the exact
        nearest). On Fashion-MNIST 10k (2,000 cells) it is the nearest landmark for 99.6% of
        the test points and 10k lookups take 5.5 instead of 16 ms on 2 cores.
    candidates : int, optional
        ``K``, the least length of a centre's list; default ``max(256, m / 8)``
        (``MIN_CANDIDATES``).
    local_dims : int
        ``Q``: with ``Q > 0`` each cell also maps its points linearly along its own ``Q``
        principal directions (:func:`cell_directions`, from ``inputs``): the output gains
        ``B A_c U_c (x - mu_c)``, with ``U_c`` (Q x in_dim) fixed, ``A_c`` (``local_rank`` x Q)
        learned per cell and starting at zero, ``B`` (features x ``local_rank``) shared. Inside
        a cell the MLP alone is as smooth as everywhere; this lets each cell order its own
        points (see :class:`beyond_icon.parametric_sne.ParametricSNE`'s ``local_dims``).
        0 (default): none.
    inputs : (n, in_dim) tensor, optional
        The training inputs, needed with ``local_dims``.
    local_rank : int
        Rank of the cells' maps (2).

    References
    ----------
    Moody, J. and Darken, C. (1989). Fast learning in networks of locally-tuned processing
    units. Neural Computation 1(2). (Landmark features of k-means centres.)
    """

    LOOKUP_ROWS = 512
    LOCAL_ROWS = 8192  # rows of the cells' maps at a time (see forward)
    # (rows, m) float32 scores, 1 GiB at 4,096 cells (two levels: and a bool mask, 0.25 GiB)
    LOOKUP_ROWS_CUDA = 65536
    COARSE = 64
    TWO_LEVEL_FROM = 1024
    MIN_CANDIDATES = 256

    def __init__(
        self,
        in_dim: int,
        landmarks: Tensor,
        hidden: tuple[int, ...] = (256, 256),
        batch_norm: bool = False,
        offset_scale: float | None = None,
        coarse: int | None = None,
        candidates: int | None = None,
        local_dims: int = 0,
        inputs: Tensor | None = None,
        local_rank: int = 2,
    ):
        super().__init__(in_dim, hidden=hidden, batch_norm=batch_norm)
        if landmarks.dim() != 2 or landmarks.shape[1] != in_dim or len(landmarks) < 2:
            raise ValueError(f"landmarks must be (m >= 2, {in_dim}), got {tuple(landmarks.shape)}")
        if not hidden:
            raise ValueError("CellMLP needs at least one hidden layer")
        m = len(landmarks)
        landmarks = landmarks.detach().float().clone()  # not the caller's tensor
        self.register_buffer("landmarks", landmarks)
        self.offsets = nn.Embedding(m, hidden[0])
        nn.init.zeros_(self.offsets.weight)  # it starts as the plain MLP
        self.offset_scale = 0.2 * math.sqrt(m) if offset_scale is None else float(offset_scale)
        if coarse is None:
            coarse = self.COARSE if m >= self.TWO_LEVEL_FROM else 0
        if coarse:
            k = max(self.MIN_CANDIDATES, m // 8) if candidates is None else int(candidates)
            centres, lists = coarse_index(landmarks, int(coarse), min(k, m))
            self.register_buffer("coarse", centres)
            self.register_buffer("coarse_lists", lists)
            self._build_tables()
        if not is_int(local_dims) or local_dims < 0:
            raise ValueError(f"local_dims must be a non-negative integer, got {local_dims!r}")
        if not is_int(local_rank) or local_rank < 1:
            raise ValueError(f"local_rank must be a positive integer, got {local_rank!r}")
        self.local_dims = min(int(local_dims), in_dim)
        self.local_rank = int(local_rank)
        if self.local_dims:
            if inputs is None:
                raise ValueError(
                    "local_dims needs the training inputs (inputs=...): each cell's directions "
                    "are those of its training points"
                )
            inputs = inputs.detach().float().flatten(1)
            bases = cell_directions(inputs, self.cells(inputs), landmarks, self.local_dims)
            self.register_buffer("local_basis", bases)
            self.local = nn.Embedding(m, self.local_rank * self.local_dims)
            nn.init.zeros_(self.local.weight)  # it starts as the CellMLP without it
            self.local_out = nn.Linear(self.local_rank, self.feature_dim, bias=False)

    @torch.no_grad()
    def _build_tables(self) -> None:
        """The lookup's tables, derived from the buffers (not saved: rebuilt on load, moved by
        ``to``): the centres' scores (d + 1, G), each list's landmarks' scores (G, d + 1, K')
        and which landmarks each list leaves out (G, m)."""
        lists = self.coarse_lists
        blocked = torch.ones(len(self.coarse), len(self.landmarks), dtype=torch.bool)
        blocked = blocked.to(lists.device).scatter(1, lists, torch.zeros_like(lists, dtype=bool))
        tables = {
            "centre_scores": self._coarse_scores().T.contiguous(),
            "list_scores": self._scores()[lists].permute(0, 2, 1).contiguous(),
            "blocked": blocked,
        }
        for name, value in tables.items():
            if name in self._buffers:
                self._buffers[name] = value
            else:
                self.register_buffer(name, value, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the lists' width depends on the landmarks (the largest group): take the saved shape
        for name in ("coarse", "coarse_lists"):
            saved, mine = state_dict.get(prefix + name), self._buffers.get(name)
            if saved is not None and mine is not None and saved.shape != mine.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=mine.dtype, device=mine.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._two_level():
            self._build_tables()

    def _two_level(self) -> bool:
        # a CellMLP pickled before the two-level lookup has neither buffer: the exact one
        return getattr(self, "coarse", None) is not None

    def _coarse_scores(self) -> Tensor:
        return torch.cat([self.coarse, -0.5 * self.coarse.pow(2).sum(1, keepdim=True)], 1)

    def _scores(self) -> Tensor:
        """``[mu_l, -|mu_l|^2 / 2]`` per landmark: ``argmax_l [x, 1] . scores_l`` is the
        nearest landmark (one matmul, no (n, m) broadcast of the norms)."""
        norms = self.landmarks.pow(2).sum(1, keepdim=True)
        return torch.cat([self.landmarks, -0.5 * norms], 1)

    @staticmethod
    def _with_ones(x: Tensor) -> Tensor:
        return F.pad(x.flatten(1).float(), (0, 1), value=1.0)  # [x, 1], whatever the rows

    @torch.no_grad()
    def cells(self, x: Tensor) -> Tensor:
        """Index of the nearest landmark of each row of ``x`` (float32, even under autocast)."""
        with torch.autocast(x.device.type, enabled=False):
            x = self._with_ones(x)
            in_numpy = x.device.type == "cpu" and not _opaque_to_numpy(x)
            if in_numpy and self._two_level():
                # each centre's points against its list only: 10k rows and 2,000 cells,
                # 16 -> 5.5 ms on 2 cores (G = 64, lists of 256); torch's matmuls (numpy's
                # BLAS threads would fight torch's for the cores) and numpy's argmax
                tables, lists = self.list_scores, self.coarse_lists.numpy()
                group = (x @ self.centre_scores).numpy().argmax(1)
                order = np.argsort(group, kind="stable")
                counts = np.bincount(group, minlength=len(tables))
                found, start = np.empty(len(x), dtype=np.int64), 0
                rows = x[torch.from_numpy(order)]
                for j in np.flatnonzero(counts):
                    stop = start + counts[j]
                    best = (rows[start:stop] @ tables[j]).numpy().argmax(1)
                    found[order[start:stop]] = lists[j][best]
                    start = stop
                return torch.from_numpy(found)
            # one matmul (a step of 512 rows, 5.4 -> 4.4 ms on 2 cores against a broadcast)
            scores = self._scores().T.contiguous()
            # blocks of rows whose (rows, m) scores stay in cache: 10k rows and 2,048 cells,
            # 37 -> 17 ms on 2 cores (on a GPU, blocks that bound the memory)
            if not in_numpy:
                rows = self.LOOKUP_ROWS_CUDA
                if self._two_level():  # every landmark scored, those off the list masked

                    def nearest(block: Tensor) -> Tensor:
                        group = (block @ self.centre_scores).argmax(1)
                        masked = (block @ scores).masked_fill_(self.blocked[group], -math.inf)
                        return masked.argmax(1)

                else:

                    def nearest(block: Tensor) -> Tensor:
                        return (block @ scores).argmax(1)

                if len(x) <= rows:
                    return nearest(x)
                return torch.cat([nearest(x[s : s + rows]) for s in range(0, len(x), rows)])
            # numpy's argmax is vectorised, torch's is not on the CPU: 10k rows and 2,000
            # cells, 17 -> 11 ms; 4,096 cells 23 ms, in blocks of 512 rows (28 with 1,024)
            rows, found = self.LOOKUP_ROWS, [np.zeros(0, dtype=np.int64)]
            for s in range(0, len(x), rows):
                found.append((x[s : s + rows] @ scores).numpy().argmax(1))
            return torch.from_numpy(np.concatenate(found))

    @torch.no_grad()
    def nearest_among(self, x: Tensor, candidates: Tensor) -> Tensor:
        """The nearest landmark of each row of ``x`` among that row's candidates.

        Parameters
        ----------
        x : (n, in_dim) tensor
        candidates : (n, K) integer tensor
            Landmark indices per row.

        Returns
        -------
        (n,) tensor of landmark indices; ``cells(x)`` wherever a row's candidates hold it.
        """
        with torch.autocast(x.device.type, enabled=False):
            # (n, K, d + 1) gathered rows against each x: K = 32 of 2,048 cells and 512 rows,
            # 0.3 ms where the full matmul and its argmax take 0.9 ms on 2 cores
            # (index_select: 0.05 ms where candidates-as-index takes 0.17 ms for those rows)
            gathered = self._scores().index_select(0, candidates.flatten())
            gathered = gathered.view(*candidates.shape, -1)
            ones = self._with_ones(x)
            scores = (gathered * ones[:, None, :]).sum(-1)
            if self._two_level():  # only the candidates on the list of the row's centre
                group = (ones @ self.centre_scores).argmax(1)
                blocked = self.blocked[group[:, None], candidates]
                scores = scores.masked_fill_(blocked, -math.inf)
                found = candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
                missing = blocked.all(1)  # no candidate on the list: the full lookup
                if x.device.type == "cpu" and not _opaque_to_numpy(x):
                    if bool(missing.any()):
                        found[missing] = self.cells(x[missing])
                    return found
                return torch.where(missing, self.cells(x), found)  # no sync on a GPU
            return candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)

    def cells_near(self, x: Tensor, clean: Tensor, near: Tensor) -> Tensor:
        """The cell of each row of ``x`` (a noisy input) among the cells nearest its clean
        input's cell, ``nearest_among(x, near[clean])``: the cell lookup of training.

        Parameters
        ----------
        x : (n, in_dim) tensor
        clean : (n,) integer tensor
            The cell of each row's clean input (:meth:`cells`).
        near : (m, K) integer tensor
            Each cell's nearest cells, itself first (:meth:`neighbouring_cells`).

        Returns
        -------
        (n,) tensor of landmark indices.
        """
        return self.nearest_among(x, near.index_select(0, clean))

    def neighbouring_cells(self, k: int) -> Tensor:
        """(m, min(k, m)) indices of each landmark's ``k`` nearest landmarks, itself first."""
        distances = torch.cdist(self.landmarks, self.landmarks)
        distances.fill_diagonal_(-1.0)  # itself first, even among duplicates
        return distances.topk(min(k, len(distances)), dim=1, largest=False).indices

    def forward(self, x: Tensor, cells: Tensor | None = None) -> Tensor:
        """``relu(W x + b + s e_c)`` then the other layers, with ``c = cells(x)`` unless the
        cells are given (:meth:`nearest_among`)."""
        x = x.flatten(1)
        cells = self.cells(x) if cells is None else cells
        out = self._features(x, cells)
        basis = getattr(self, "local_basis", None)  # a CellMLP pickled before it: none
        if basis is None:
            return out
        # the row's coordinates along its cell's own directions, mapped by the cell's A_c; in
        # blocks of rows, since each row gathers a (Q, in_dim) basis (transform's chunks of
        # 65,536 rows of raw 784-pixel inputs: 1 GB at once)
        rows = self.LOCAL_ROWS
        local = [
            self._local(x[s : s + rows], cells[s : s + rows], basis) for s in range(0, len(x), rows)
        ]
        return out + (local[0] if len(local) == 1 else torch.cat(local))

    def _features(self, x: Tensor, cells: Tensor) -> Tensor:
        """The MLP with the cells' vectors, without their maps: ``relu(W x + b + s e_c)``
        then the other layers."""
        return self.net[1:](self.net[0](x) + self.offset_scale * self.offsets(cells))

    def embed(self, x: Tensor, head: nn.Linear) -> Tensor:
        """``head(forward(x))``, with the cells' maps folded through the linear ``head``.

        ``head(h + B A_c U_c (x - mu_c)) = head(h) + G_c (x - mu_c)`` with ``G_c = W B A_c
        U_c`` (``W``: the head's weight), an (out, in_dim) matrix per cell built once per call:
        each row gathers ``out x in_dim`` numbers instead of its ``Q x in_dim`` basis (fewer
        when ``out <= Q``), and the ``(n, features)`` map of the maps is never formed. The
        same function as ``forward`` then ``head``, up to float rounding (the sums are taken
        in another order).

        Parameters
        ----------
        x : (n, in_dim) tensor
        head : torch.nn.Linear
            The linear layer that follows this module (``feature_dim`` -> out).

        Returns
        -------
        (n, out) tensor
        """
        x = x.flatten(1)
        cells = self.cells(x)
        out = head(self._features(x, cells))
        basis = getattr(self, "local_basis", None)
        if basis is None:
            return out
        maps = self.local.weight.view(-1, self.local_rank, self.local_dims)
        folded = torch.matmul(head.weight @ self.local_out.weight, maps) @ basis
        # in blocks of rows, as forward's maps: each row gathers an (out, in_dim) matrix
        rows = self.LOCAL_ROWS
        local = [
            torch.bmm(
                folded.index_select(0, c),
                (block - self.landmarks.index_select(0, c)).unsqueeze(-1),
            ).squeeze(-1)
            for block, c in zip(x.split(rows), cells.split(rows))
        ]
        return out + (local[0] if len(local) == 1 else torch.cat(local))

    def _local(self, x: Tensor, cells: Tensor, basis: Tensor) -> Tensor:
        """``B A_c U_c (x - mu_c)`` of each row."""
        offset = (x - self.landmarks.index_select(0, cells)).unsqueeze(-1)
        along = torch.bmm(basis.index_select(0, cells).to(offset.dtype), offset)
        maps = self.local(cells).view(len(cells), self.local_rank, self.local_dims)
        return self.local_out(torch.bmm(maps.to(along.dtype), along).squeeze(-1))

    def extra_repr(self) -> str:
        local = getattr(self, "local_dims", 0)
        return f"cells={len(self.landmarks)}" + (f", local_dims={local}" if local else "")


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages, halving the resolution until it is 4x4 or less, then global pooling.

    8x8 inputs get two stride-2 stages, 28x28 and 32x32 three; widths 32, 64, 128, 256.

    Parameters
    ----------
    in_channels : int
    image_size : int
    width : int
        Channels of the first stage (doubled at each halving).
    """

    def __init__(self, in_channels: int, image_size: int, width: int = 32):
        super().__init__()
        layers = [_conv_bn(in_channels, width)]
        size, channels = image_size, width
        while size > 4:
            layers.append(_conv_bn(channels, channels * 2, stride=2))
            layers.append(_conv_bn(channels * 2, channels * 2))
            channels *= 2
            size = math.ceil(size / 2)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(c_in, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.shortcut = _shortcut(c_in, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem: a 3x3 first convolution, stride 1, no max-pool.

    Parameters
    ----------
    block : type
        The residual block (basic or bottleneck).
    layers : tuple of int
        Blocks per stage.
    in_channels : int

    References
    ----------
    He, K. et al. (2016). Deep residual learning for image recognition. CVPR.
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages, c_in = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(block(c_in, planes, stride))
                c_in = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


def resnet18(in_channels: int = 3) -> ResNet:
    """ResNet-18 with the CIFAR stem (512-d features).

    Parameters
    ----------
    in_channels : int

    Returns
    -------
    ResNet

    References
    ----------
    He, K. et al. (2016). Deep residual learning for image recognition. CVPR.
    """
    return ResNet(_Basic, (2, 2, 2, 2), in_channels)


def resnet50(in_channels: int = 3) -> ResNet:
    """ResNet-50 with the CIFAR stem (2048-d features).

    Parameters
    ----------
    in_channels : int

    Returns
    -------
    ResNet

    References
    ----------
    He, K. et al. (2016). Deep residual learning for image recognition. CVPR.
    """
    return ResNet(_Bottleneck, (3, 4, 6, 3), in_channels)


class ProjectionHead(nn.Module):
    """MLP projection ``feature_dim -> hidden -> out_dim`` whose output feeds the loss.

    Parameters
    ----------
    in_dim : int
    out_dim : int
    hidden : int, optional
        Default ``in_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class HeadLinear(nn.Module):
    """``n_heads`` independent linear maps run as one batched product.

    Input (n, d) (shared by every head) or (n_heads, n, d); output (n_heads, n, out).
    Initialised as ``nn.Linear`` is: uniform in ``+-1/sqrt(d)``.
    """

    def __init__(self, in_dim: int, out_dim: int, n_heads: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n_heads, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = (
            nn.Parameter(torch.empty(n_heads, 1, out_dim).uniform_(-bound, bound)) if bias else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            out = torch.einsum("nd,hdo->hno", x, self.weight)
        else:
            out = torch.bmm(x, self.weight)
        return out if self.bias is None else out + self.bias


class ClusterHead(nn.Module):
    """``n_heads`` independent heads mapping features to ``n_clusters`` logits each.

    Output shape (n_heads, n, n_clusters); the heads run as batched products.

    ``kind``:

    - ``"linear"``: one linear map (the paper's head);
    - ``"mlp"``: one hidden layer of ``hidden`` units, GELU;
    - ``"temi"``: TEMI's (and DINO's) head: a 3-layer MLP (``hidden`` units, GELU) to a
      256-d bottleneck, L2-normalised, then a weight-normalised linear layer without bias
      (unit-norm cluster prototypes), divided by ``temperature``: logits are cosines / 0.1.

    Parameters
    ----------
    in_dim : int
    n_clusters : int
    n_heads : int
    kind : {"linear", "mlp", "temi"}
    hidden : int
        Width of the hidden layers (mlp, temi).
    bottleneck : int
        The temi head's bottleneck.
    temperature : float
        The temi head's logit temperature.

    References
    ----------
    Adaloglou et al., "Exploring the Limits of Deep Image Clustering using Pretrained Models"
    (TEMI), BMVC 2023; Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers" (DINO), ICCV 2021.
    """

    KINDS = ("linear", "mlp", "temi")

    def __init__(
        self,
        in_dim: int,
        n_clusters: int,
        n_heads: int = 1,
        kind: str = "linear",
        hidden: int = 512,
        bottleneck: int = 256,
        temperature: float = 0.1,
    ):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"head must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind
        self.temperature = temperature
        if kind == "linear":
            self.body = nn.Identity()
            self.last = HeadLinear(in_dim, n_clusters, n_heads)
        elif kind == "mlp":
            self.body = nn.Sequential(HeadLinear(in_dim, hidden, n_heads), nn.GELU())
            self.last = HeadLinear(hidden, n_clusters, n_heads)
        else:
            self.body = nn.Sequential(
                HeadLinear(in_dim, hidden, n_heads),
                nn.GELU(),
                HeadLinear(hidden, hidden, n_heads),
                nn.GELU(),
                HeadLinear(hidden, bottleneck, n_heads),
            )
            self.last = HeadLinear(bottleneck, n_clusters, n_heads, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind != "temi":
            return self.last(self.body(x))
        z = F.normalize(self.body(x), dim=-1)
        prototypes = F.normalize(self.last.weight, dim=1)  # unit-norm columns
        return torch.bmm(z, prototypes) / self.temperature


BACKBONES = ("auto", "mlp", "cnn", "resnet18", "resnet50")


def build_backbone(name: str, input_shape: tuple[int, ...]) -> nn.Module:
    """A backbone for inputs of ``input_shape`` ((D,) vectors or (C, H, W) images).

    ``auto``: the small CNN for images, the MLP for vectors. The module has ``feature_dim``.

    Parameters
    ----------
    name : {"auto", "mlp", "cnn", "resnet18", "resnet50"}
    input_shape : tuple of int

    Returns
    -------
    nn.Module
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    is_image = len(input_shape) == 3
    if name == "auto":
        name = "cnn" if is_image else "mlp"
    if name == "mlp":
        return MLP(int(math.prod(input_shape)))
    if not is_image:
        raise ValueError(
            f"backbone {name!r} needs images (C, H, W); the data are {input_shape[0]}-d vectors"
        )
    channels, height, width = input_shape
    if name == "cnn":
        return SmallCNN(channels, max(height, width))
    return (resnet18 if name == "resnet18" else resnet50)(channels)
