"""Clustering frozen embeddings with any divergence: the I-Con cluster head, and TEMI's PMI.

Each anchor is paired with one of its mined k nearest neighbours (cosine, on the features as
given, over the whole training set); the pair shares an id. I-Con: p puts ``1 - neighbor_mix``
on the pair-mate and ``neighbor_mix`` (default 0.75) uniformly on the batch's own
``batch_neighbors`` nearest points (Euclidean on the standardised features; optionally walked
along that graph), q = the cluster-sharing kernel of the head's soft assignments (optionally
against an EMA teacher's); every row is an anchor, so the loss is symmetric in the pair.
Several heads train at once; the one with the lowest loss over the last epoch is evaluated.
``loss="pmi"`` trains TEMI's beta-PMI instead (the KL-family reference).

A dataset with a test split of its own (CIFAR-10, Fashion-MNIST, digits) is trained on its
train split and scored on its test split. One without (an ``embeddings:`` file, an image folder
without ``test/``) is clustered and scored whole, every point, as in the paper:
``assignments.npz`` then lists the points in the source's order (an ``extract`` folder's:
its ``files_train.txt`` then ``files_test.txt``), with their row numbers in the source
(``rows``) wherever the split was made here.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from beyond_icon import metrics, report
from beyond_icon._validation import check_positive, is_int
from beyond_icon.data import as_float
from beyond_icon.distributed import all_reduce_sum, is_main, world
from beyond_icon.methods import PMI, ClusterLoss
from beyond_icon.models import ClusterHead, L2Normalize, Standardize
from beyond_icon.neighbors import cached_neighbors
from beyond_icon.tasks.common import (
    TaskConfig,
    begin,
    check_finite_where_p_is_zero,
    claim_run,
    finish,
    identity,
    option,
    peak_gpu_memory,
)
from beyond_icon.train import (
    SCHEDULE_HELP,
    SCHEDULES,
    TrainConfig,
    fit,
    seed_everything,
    split_batches,
    write_csv,
)

__all__ = ["ClusterConfig", "ClusterResult", "run"]


@dataclass
class ClusterConfig(TaskConfig):
    """Settings of one ``beyond-icon cluster`` run."""

    task: ClassVar[str] = "cluster"
    # 2: data without a test split of its own is clustered and scored whole (1: its 75% train
    # split), so a run of 1 is neither resumed on all points nor mixed into a sweep's table
    recipe: ClassVar[int] = 2
    # evaluation only: the k-means baseline, and self-labelling (a stage after the training,
    # scored apart), which may be added to a finished run with --resume
    not_identity: ClassVar[tuple[str, ...]] = TaskConfig.not_identity + (
        "kmeans_init",
        "self_label_steps",
        "self_label_lr",
        "self_label_threshold",
    )
    renamed: ClassVar[dict[str, str]] = {
        "epochs": "the budget is counted in optimiser steps, use n_steps (--n-steps; default "
        "max(2000, 30 n / batch_size))",
        "lr_step_epochs": "use schedule (--schedule step halves the learning rate at 1/3 and 2/3 "
        "of the steps, as the paper's 30 epochs halved every 10 do)",
    }
    pca_components: int | None = option(
        None, "PCA of the (flattened) inputs before clustering (0 or none: as given)"
    )
    n_clusters: int | None = option(None, "K (default: the number of classes)")
    divergence: str = option("tv", "kl, tv, jsd, hellinger, ... (loss=icon)")
    loss: str = option("icon", "icon (the I-Con cluster loss) or pmi (TEMI's beta-PMI)")
    head: str = option(
        "linear",
        "linear, mlp or temi (MLP, L2-normalised bottleneck, weight-normalised prototypes)",
    )
    head_input: str = option(
        "standardize", "what the head sees: standardize (per feature), l2 (unit rows) or none"
    )
    n_heads: int = option(10, "heads trained at once; the lowest-loss head is evaluated")
    n_neighbors: int = option(20, "k of the mined k-NN from which each anchor's partner is drawn")
    n_positives: int = option(
        1, "mined neighbours drawn per anchor into the batch (p uniform over them; pmi: 1)"
    )
    neighbor_mix: float = option(
        0.75,
        "mass of each row of p on the batch's own batch_neighbors nearest points, Euclidean on "
        "the standardised features (0: the pair-mate only, the paper's p)",
    )
    batch_neighbors: int | None = option(
        None, "k of the batch's k-NN graph that neighbor_mix spreads p over (default: n_neighbors)"
    )
    propagate_steps: int = option(1, "k-NN walk length for p (1 = no walk)")
    debias: float = option(0.0, "mix with uniform, alpha in [0, 1)")
    debias_side: str = option("p", "p, q or both")
    exclude_self: bool = option(False, "drop j = i from q, as p does (consistent self-pairs)")
    same_sample_positive: bool = option(
        False, "a sample drawn twice into a batch is its own positive in p"
    )
    ema_teacher: float | None = option(
        None, "EMA momentum of a teacher head for q's second factor (none: no teacher)"
    )
    beta: float = option(0.6, "beta of TEMI's beta-PMI (loss=pmi)")
    n_steps: int | None = option(
        None,
        "optimiser steps, rounded up to whole passes (default max(2000, 30 n / batch_size))",
    )
    batch_size: int = option(
        256,
        "anchors per batch, about (n // batch_size equal batches a pass; each anchor with a neighbour)",
    )
    lr: float = option(1e-2, "Adam learning rate")
    schedule: str = option("step", SCHEDULE_HELP)
    optimizer: str = option("adam", "adam or adamw (decoupled weight decay, TEMI's)")
    weight_decay: float = option(0.0, "weight decay of the optimiser")
    kmeans_init: int = option(10, "k-means restarts of the baseline (0: no k-means baseline)")
    self_label_steps: int = option(
        0,
        "steps of SCAN-style self-labelling after training (0: off): the evaluated head is "
        "trained by class-balanced cross-entropy on its own confident assignments; scored apart "
        "as selflabel_*",
    )
    self_label_lr: float = option(
        1e-3, "Adam learning rate of self-labelling (the training's lr 1e-2 lowered results)"
    )
    self_label_threshold: float = option(
        0.99, "confidence (largest soft assignment) above which a point is a pseudo-label"
    )


@dataclass
class ClusterResult:
    """What :func:`run` returns.

    Attributes
    ----------
    metrics : dict
        What ``metrics.json`` holds.
    assignments : array
        The evaluated head's clusters of the evaluation split (the test split, or every point
        of data without one, in the source's order).
    history : list of dict
        One row per optimiser step.
    """

    metrics: dict
    assignments: np.ndarray
    history: list[dict]


def _features(dataset, config) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) as (n, d) arrays. A float16 table (an extract folder, memory-mapped) stays
    as it is: rows are made float32 only when a batch uses them."""

    def flat(x):
        if x.dtype == np.float16 and x.ndim == 2:
            return x
        return as_float(x).reshape(len(x), int(np.prod(x.shape[1:])))  # 0 rows too

    train, test = flat(dataset.x_train), flat(dataset.x_test)
    components = config.pca_components
    if components is not None and (not isinstance(components, int) or components < 0):
        raise ValueError(
            f"pca_components must be an integer >= 0 or none (0 or none: as given), got "
            f"{components!r}"
        )
    if components and train.shape[1] > components:
        from sklearn.decomposition import PCA

        # fewer points than components: as many components as points (PCA's most)
        pca = PCA(min(components, len(train)), random_state=0).fit(train)
        train = pca.transform(train).astype(np.float32)
        # a dataset clustered whole has an empty test split (scikit-learn refuses 0 rows)
        test = pca.transform(test).astype(np.float32) if len(test) else train[:0]
    return train, test


def _check(config: ClusterConfig, n_train: int, k: int) -> None:
    if config.loss not in ("icon", "pmi"):
        raise ValueError(f"loss must be 'icon' or 'pmi', got {config.loss!r}")
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {config.batch_size!r}")
    if config.loss == "icon" and not (config.debias > 0 and config.debias_side != "q"):
        check_finite_where_p_is_zero(
            config.divergence,
            "outside each point's mined neighbours",
            "use --debias A > 0 (p mixed with uniform)",
        )
    if k < 2 or k > n_train:
        raise ValueError(
            f"n_clusters must be in [2, {n_train}] (the number of training points), got {k}"
        )
    if not 1 <= config.n_neighbors < n_train:
        raise ValueError(f"n_neighbors must be in [1, {n_train - 1}], got {config.n_neighbors}")
    if config.head_input not in ("standardize", "l2", "none"):
        raise ValueError(f"head_input must be standardize, l2 or none, got {config.head_input!r}")
    if config.n_steps is not None and config.n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {config.n_steps}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    if not 1 <= config.n_positives <= config.n_neighbors:
        raise ValueError(
            f"n_positives must be in [1, n_neighbors={config.n_neighbors}], got {config.n_positives}"
        )
    if config.loss == "pmi" and config.n_positives != 1:
        raise ValueError("loss=pmi trains on pairs: n_positives must be 1")
    if config.loss == "pmi":  # the I-Con loss does not read beta
        check_positive(config.beta, "beta")
    if not (is_int(config.kmeans_init) and config.kmeans_init >= 0):
        raise ValueError(
            "kmeans_init must be an integer >= 0 (0: no k-means baseline), "
            f"got {config.kmeans_init!r}"
        )
    points = _batch_points(config, n_train)
    if config.batch_neighbors is not None and (
        isinstance(config.batch_neighbors, bool)
        or not isinstance(config.batch_neighbors, int)
        or not 1 <= config.batch_neighbors < points
    ):
        raise ValueError(
            f"batch_neighbors must be in [1, {points - 1}] (the batch's points), got "
            f"{config.batch_neighbors}"
        )
    if config.n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {config.n_heads}")
    if config.ema_teacher is not None and not 0.0 <= config.ema_teacher < 1.0:
        raise ValueError(f"ema_teacher momentum must be in [0, 1), got {config.ema_teacher}")
    if isinstance(config.self_label_steps, bool) or not (
        isinstance(config.self_label_steps, int) and config.self_label_steps >= 0
    ):
        raise ValueError(
            f"self_label_steps must be a non-negative integer, got {config.self_label_steps!r}"
        )
    if not config.self_label_lr > 0:
        raise ValueError(f"self_label_lr must be positive, got {config.self_label_lr}")
    if not 0.0 < config.self_label_threshold < 1.0:
        raise ValueError(
            f"self_label_threshold must be in (0, 1), got {config.self_label_threshold}"
        )
    _icon_loss(config, n_train)  # the preset checks its own options (p's), before the mining


def _batch_points(config: ClusterConfig, n_train: int) -> int:
    """Rows of one batch: the anchors and their mined positives."""
    return (1 + config.n_positives) * min(config.batch_size, n_train)


def _icon_loss(config: ClusterConfig, n_train: int) -> ClusterLoss:
    """The I-Con cluster loss of ``config``; the batch's k-NN graph in p has ``batch_neighbors``
    (default ``n_neighbors``, at most the batch's other points)."""
    graph_k = config.batch_neighbors
    if graph_k is None:
        graph_k = max(1, min(config.n_neighbors, _batch_points(config, n_train) - 1))
    return ClusterLoss(
        config.divergence,
        debias=config.debias,
        debias_side=config.debias_side,
        exclude_self=config.exclude_self,
        propagate_steps=config.propagate_steps,
        n_neighbors=graph_k,
        neighbor_mix=config.neighbor_mix,
    )


class _HeadLosses(nn.Module):
    """Each head's loss summed over the current epoch, and the epoch's steps so far: buffers,
    saved with a checkpoint, so that a finished run resumed picks the same best head."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("total", torch.zeros(n_heads))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        self.total.zero_()
        self.steps.zero_()

    def add(self, losses: Tensor) -> None:
        self.total.add_(losses)
        self.steps.add_(1)


class _HeadTrainer:
    """The heads, the losses and the batches of one cluster run: what ``train.fit`` needs.

    Each batch holds ``batch_size`` anchors and ``n_positives`` mined neighbours of each; the
    loss of every head is summed over the current epoch, so that the head with the lowest
    loss over the last epoch can be evaluated.
    """

    def __init__(self, config, train_x, neighbors, standardize, k: int, device: torch.device):
        # on the device whatever the head's input: the batch's k-NN graph in p uses it too
        self.config, self.device, self.standardize = config, device, standardize.to(device)
        prepare = {"standardize": standardize, "l2": L2Normalize(), "none": nn.Identity()}
        head = ClusterHead(train_x.shape[1], k, config.n_heads, config.head)
        self.model = nn.Sequential(prepare[config.head_input], head).to(device)
        self.teacher = (
            copy.deepcopy(self.model).requires_grad_(False)
            if config.ema_teacher is not None
            else None
        )
        self.icon = _icon_loss(config, len(train_x))
        # beta is read by loss=pmi alone (like divergence by loss=icon); the modules exist
        # either way, so that both losses keep the same checkpoint layout
        beta = {"beta": config.beta} if config.loss == "pmi" else {}
        self.pmi = nn.ModuleList(PMI(k, **beta) for _ in range(config.n_heads)).to(device)
        # a memory-mapped table is read a batch at a time; anything else is held on the device
        self.x = train_x if isinstance(train_x, np.memmap) else torch.as_tensor(train_x).to(device)
        self.knn = torch.as_tensor(neighbors)
        self.n = len(train_x)
        self.batch = min(config.batch_size, self.n)
        self.steps_per_epoch = max(1, self.n // self.batch)
        self.heads = _HeadLosses(config.n_heads).to(device)  # no sync per step

    def batches(self, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """One epoch: (anchors, their partners), the anchors a permutation of the data."""
        config = self.config
        self.heads.reset()  # the per-head losses of the current epoch only
        order = torch.randperm(self.n, generator=generator)
        # n_positives distinct neighbours per anchor, drawn uniformly from its n_neighbors
        if config.n_positives == 1:
            choice = torch.randint(0, config.n_neighbors, (self.n, 1), generator=generator)
        else:
            choice = torch.rand(self.n, config.n_neighbors, generator=generator).argsort(dim=1)
        partners = self.knn[order[:, None], choice[:, : config.n_positives]]
        return split_batches(self.batch, order, partners)

    def rows(self, index: Tensor) -> Tensor:
        """float32 features of ``index`` on the device."""
        if isinstance(self.x, np.memmap):
            rows = np.asarray(self.x[index.numpy()], dtype=np.float32)
            return torch.from_numpy(rows).to(self.device)
        return self.x[index.to(self.device)].float()

    def loss(self, item: tuple[Tensor, Tensor]) -> Tensor:
        """The mean over heads of each head's loss on the batch."""
        config = self.config
        anchors, partners = item  # (b,), (b, n_positives)
        index = torch.cat([anchors, partners.T.flatten()])
        x = self.rows(index)
        index = index.to(self.device)
        logits = self.model(x).float()  # (heads, (1 + n_positives) b, k)
        teacher = self.teacher(x).float() if self.teacher is not None else None
        if config.loss == "pmi":
            half = len(anchors)
            t = teacher if teacher is not None else logits.detach()
            losses = torch.stack(
                [
                    pmi(logits[h, :half], logits[h, half:], t[h, :half], t[h, half:])
                    for h, pmi in enumerate(self.pmi)
                ]
            )
        else:
            losses = self.icon(
                logits,
                torch.arange(len(anchors), device=self.device).repeat(config.n_positives + 1),
                teacher,
                sample_index=index if config.same_sample_positive else None,
                features=self.standardize(x) if config.neighbor_mix > 0 else None,
            )
        # each head's loss over the global batch (the mean of the ranks' shares under torchrun),
        # so that the best head is the one process's choice whatever the number of ranks
        self.heads.add(all_reduce_sum(losses.detach().float()) / world()[1])
        return losses.mean()

    def ema_update(self) -> None:
        if self.teacher is None:
            return
        momentum = self.config.ema_teacher
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.model.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

    def fit(self, out: Path | None, resume: bool, verbose: bool, run_identity: dict) -> list[dict]:
        config = self.config
        n_steps = config.n_steps or max(2000, math.ceil(30 * self.n / self.batch))
        train_config = TrainConfig(
            epochs=math.ceil(n_steps / self.steps_per_epoch),  # whole passes over the anchors
            lr=config.lr,
            seed=config.seed,
            schedule=config.schedule,
            optimizer=config.optimizer,
            weight_decay=config.weight_decay,
        )
        state = {"pmi": self.pmi, "heads": self.heads}
        state |= {"teacher": self.teacher} if self.teacher is not None else {}
        train_config.check()  # lr, schedule, warmup: before the folder is touched
        claim_run(config, out, resume)  # every option checked: the folder is the run's now
        return fit(
            self.model,
            self.batches,
            self.loss,
            train_config,
            device=self.device,
            out_dir=out,
            resume=resume,
            state_modules=state,
            after_step=self.ema_update,
            desc=f"cluster[{config.divergence if config.loss == 'icon' else 'pmi'}]",
            verbose=verbose,
            identity=run_identity,
        )

    def best_head(self) -> int:
        """The head with the lowest loss over the last epoch (kept in the checkpoint, so a
        finished run resumed picks the same head)."""
        steps = int(self.heads.steps)
        if not steps:
            return 0
        return int(torch.argmin(self.heads.total / steps))

    @torch.no_grad()
    def probabilities(
        self, x: np.ndarray | Tensor, head: int, model: nn.Module | None = None
    ) -> Tensor:
        """Soft assignments of ``x`` (an array, or a tensor already on the device) by one head
        (of ``model``, default the trained one), (n, K) on the CPU, in blocks of rows."""
        model = self.model if model is None else model
        model.eval()

        def block(i: int) -> Tensor:
            if isinstance(x, Tensor):
                return x[i : i + 8192].float()
            return torch.from_numpy(np.asarray(x[i : i + 8192], np.float32)).to(self.device)

        blocks = [model(block(i))[head].float().softmax(-1).cpu() for i in range(0, len(x), 8192)]
        return torch.cat(blocks)

    def assign(
        self, x: np.ndarray | Tensor, head: int, model: nn.Module | None = None
    ) -> np.ndarray:
        """Hard cluster assignments of ``x`` by one head, in blocks of rows."""
        return self.probabilities(x, head, model).argmax(1).numpy()

    def self_label(self, head: int, verbose: bool) -> tuple[nn.Module, dict]:
        """SCAN's self-labelling stage on frozen features, without augmentations.

        A copy of the model, whose ``head`` is trained for ``self_label_steps`` Adam steps
        (``self_label_lr``, batches of ``batch_size``) by cross-entropy towards its own
        assignments, on the points it assigns with confidence above ``self_label_threshold``
        only, each class weighted by the inverse of its count among them (so that large
        clusters do not absorb the rest). The pseudo-labels are taken again at every pass over
        the confident points, which may grow.

        Returns
        -------
        model : nn.Module
            The self-labelled copy (the trained model is left as it was).
        stats : dict
            ``selflabel_confident_start`` / ``_end``: the confident fraction of the training
            points before and after.

        References
        ----------
        Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV 2020.
        """
        config = self.config
        model = copy.deepcopy(self.model).requires_grad_(True)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.self_label_lr)
        generator = torch.Generator().manual_seed(config.seed)
        train_x = self.x  # a memory-mapped table, or the features on the device
        first = None
        step = 0
        bar = tqdm(total=config.self_label_steps, desc="self-label", disable=not verbose)
        while step < config.self_label_steps:
            probabilities = self.probabilities(train_x, head, model)
            confidence, labels = probabilities.max(1)
            keep = (confidence > config.self_label_threshold).nonzero().flatten()
            first = len(keep) / self.n if first is None else first
            if len(keep) == 0:
                break  # nothing confident: the model stays as trained
            weight = _balanced_weights(labels[keep], probabilities.shape[1]).to(self.device)
            model.train()
            order = keep[torch.randperm(len(keep), generator=generator)]
            for start in range(0, len(order), self.batch):
                if step >= config.self_label_steps:
                    break
                index = order[start : start + self.batch]
                logits = model(self.rows(index))[head].float()
                target = labels[index].to(self.device)
                loss = nn.functional.cross_entropy(logits, target, weight=weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
        bar.close()
        confidence = self.probabilities(train_x, head, model).max(1).values
        end = float((confidence > config.self_label_threshold).float().mean())
        return model, {
            "selflabel_confident_start": float(first or 0.0),
            "selflabel_confident_end": end,
        }


def _balanced_weights(labels: Tensor, k: int) -> Tensor:
    """Class weights ``w_c = m / (m_c * c_present)`` for ``m`` labels of which ``m_c`` are
    ``c``: every present class carries the same total weight ``m / c_present``, an absent one
    0, and the mean weight per label is 1."""
    counts = torch.bincount(labels, minlength=k).float()
    present = counts > 0
    weight = torch.zeros_like(counts)
    weight[present] = len(labels) / (counts[present] * int(present.sum()))
    return weight


def _mine(config: ClusterConfig, train_x: np.ndarray, device, verbose: bool):
    """The k-NN table of the training features (cached beside an embeddings file), whether it
    came from the cache, and the seconds it took."""
    cache_dir = None
    if config.data.startswith("embeddings:"):
        cache_dir = Path(config.data.split(":", 1)[1]).expanduser().parent
    started = time.perf_counter()
    # mined by cosine similarity on the features as given (L2-normalised), as TEMI and I-Con do:
    # per-feature standardisation first lowers the 20-NN label purity of digits from 0.923 to
    # 0.881 and leaves the three text-embedding sets within 0.002
    neighbors, from_cache = cached_neighbors(
        train_x, config.n_neighbors, cache_dir, device=device, verbose=verbose
    )
    return neighbors, from_cache, time.perf_counter() - started


def _scores(prefix: str, labels: np.ndarray, assignments: np.ndarray) -> dict:
    return {
        f"{prefix}acc": metrics.hungarian_accuracy(labels, assignments),
        f"{prefix}nmi": metrics.nmi(labels, assignments),
        f"{prefix}ari": metrics.adjusted_rand(labels, assignments),
    }


def _kmeans(config, standardize, train_x, eval_x, eval_y, k: int) -> tuple[dict, np.ndarray]:
    """k-means with ``kmeans_init`` restarts on the standardised features, the baseline row."""
    if config.kmeans_init <= 0:  # skips it (hours for 1000 clusters of 1.28M points)
        return {}, np.zeros(0, dtype=np.int64)
    from sklearn.cluster import KMeans

    where = standardize.mean.device  # the trainer may have moved it to the GPU

    def standardized(x):
        return standardize(torch.from_numpy(np.asarray(x, np.float32)).to(where)).cpu().numpy()

    kmeans = KMeans(k, n_init=config.kmeans_init, random_state=config.seed)
    kmeans.fit(standardized(train_x))
    assignments = kmeans.predict(standardized(eval_x))
    scores = _scores("kmeans_", eval_y, assignments)
    scores["kmeans_cluster_size_entropy"] = metrics.cluster_size_entropy(assignments, k)
    return scores, assignments


def run(
    config: ClusterConfig, out: str | Path | None = None, resume: bool = False, verbose: bool = True
) -> ClusterResult:
    """Train the head(s) on the train split, then cluster the evaluation split: the test split
    of data that has one, else every point (train and evaluation are then the whole data).

    Parameters
    ----------
    config : ClusterConfig
        The run's settings (``beyond-icon cluster --help`` lists them).
    out : path, optional
        The run folder: config.yaml, checkpoints, history.csv, figures, metrics.json (last).
    resume : bool
        Continue from ``out``'s checkpoint (the same settings; a larger budget extends the run).
    verbose : bool
        Progress bars and the metrics line.

    Returns
    -------
    ClusterResult
        Empty metrics on ranks other than 0 under torchrun.
    """
    # clustering is transductive: data without a test split of its own is clustered whole
    device, dataset, out, verbose = begin(config, out, verbose, whole=True)
    train_x, test_x = _features(dataset, config)
    k = dataset.n_classes if config.n_clusters is None else config.n_clusters
    _check(config, len(train_x), k)
    seed_everything(config.seed)
    standardize = Standardize.fit_rows(train_x)
    neighbors, from_cache, mining_time = _mine(config, train_x, device, verbose)
    trainer = _HeadTrainer(config, train_x, neighbors, standardize, k, device)
    history = trainer.fit(out, resume, verbose, identity(config, dataset))
    if not is_main():  # the other ranks helped train; rank 0 evaluates and writes
        return ClusterResult({}, np.zeros(0, dtype=np.int64), history)
    on_test = dataset.has_test_split
    eval_x, eval_y = (test_x, dataset.y_test) if on_test else (train_x, dataset.y_train)
    best_head = trainer.best_head()
    assignments = trainer.assign(eval_x, best_head)
    baseline, kmeans_assign = _kmeans(config, standardize, train_x, eval_x, eval_y, k)
    self_labelled, self_assign = {}, np.zeros(0, dtype=np.int64)
    if config.self_label_steps > 0:
        model, self_labelled = trainer.self_label(best_head, verbose)
        self_assign = trainer.assign(eval_x, best_head, model)
        self_labelled |= _scores("selflabel_", eval_y, self_assign)
        self_labelled["selflabel_cluster_size_entropy"] = metrics.cluster_size_entropy(
            self_assign, k
        )
    epochs_run = max(h["epoch"] for h in history) + 1
    seconds = history[-1]["time"]  # the loop's clock, carried across --resume segments
    result = {
        **_scores("", eval_y, assignments),
        **baseline,
        **self_labelled,
        "clusters_used": int(len(np.unique(assignments))),
        "cluster_size_entropy": metrics.cluster_size_entropy(assignments, k),
        "best_head": best_head,
        "train_time_s": seconds,
        "epoch_time_s": seconds / epochs_run,
        "step_time_s": seconds / (epochs_run * trainer.steps_per_epoch),
        "n_steps": epochs_run * trainer.steps_per_epoch,
        "mining_time_s": mining_time,
        **peak_gpu_memory(device),
        "neighbors_from_cache": from_cache,
        "evaluated_on": "test" if on_test else "all",
    }

    def write(out: Path) -> None:
        write_csv(history, out / "history.csv")
        # rows: each point's row in the source, for data clustered whole (in that order)
        rows = dataset.train_rows if not on_test and dataset.train_rows is not None else None
        np.savez(
            out / "assignments.npz",
            clusters=assignments,
            labels=eval_y,
            kmeans=kmeans_assign,
            selflabel=self_assign,
            **({} if rows is None else {"rows": rows}),
        )
        title = f"{dataset.name}: {config.loss} {config.divergence}, acc {result['acc']:.3f}"
        report.plot_confusion(eval_y, assignments, dataset.classes, out / "confusion.png", title)

    finish(result, out, verbose, write, config)
    return ClusterResult(result, assignments, history)
