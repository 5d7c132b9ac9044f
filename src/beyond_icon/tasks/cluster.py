"""Clustering frozen embeddings with any divergence: the I-Con cluster head, and TEMI's PMI.

Each anchor is paired with one of its mined k nearest neighbours (cosine, on the features as
given, over the whole training set); the pair shares an id. I-Con pair: p = views over pairs (optionally walked
along the in-batch k-NN graph), q = the cluster-sharing kernel of the head's soft assignments
(optionally against an EMA teacher's); every row is an anchor, so the loss is symmetric in the
pair. Several heads train at once; the one with the lowest loss over the last epoch is
evaluated. ``loss="pmi"`` trains TEMI's beta-PMI instead (the KL-family reference).
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
from torch import nn

from beyond_icon import metrics, report
from beyond_icon.data import as_float
from beyond_icon.distributed import is_main
from beyond_icon.methods import PMI, ClusterLoss
from beyond_icon.models import ClusterHead, L2Normalize, Standardize
from beyond_icon.neighbors import cached_neighbors
from beyond_icon.tasks.common import TaskConfig, begin, identity
from beyond_icon.train import TrainConfig, fit, seed_everything, write_csv

__all__ = ["ClusterConfig", "ClusterResult", "run"]


@dataclass
class ClusterConfig(TaskConfig):
    """Settings of one ``beyond-icon cluster`` run."""

    task: ClassVar[str] = "cluster"
    not_identity: ClassVar[tuple[str, ...]] = TaskConfig.not_identity + ("kmeans_init",)
    renamed: ClassVar[dict[str, str]] = {
        "epochs": "the budget is counted in optimiser steps, use n_steps (--n-steps; default "
        "max(2000, 30 n / batch_size))",
        "lr_step_epochs": "use schedule (--schedule step halves the learning rate at 1/3 and 2/3 "
        "of the steps, as the paper's 30 epochs halved every 10 do)",
    }
    help: ClassVar[dict[str, str]] = TaskConfig.help | {
        "pca_components": "PCA of the (flattened) inputs before clustering (none: as given)",
        "n_clusters": "K (default: the number of classes)",
        "divergence": "kl, tv, jsd, hellinger, ... (loss=icon)",
        "loss": "icon (the I-Con cluster loss) or pmi (TEMI's beta-PMI)",
        "head": "linear, mlp or temi (MLP, L2-normalised bottleneck, weight-normalised prototypes)",
        "head_input": "what the head sees: standardize (per feature), l2 (unit rows) or none",
        "n_heads": "heads trained at once; the lowest-loss head is evaluated",
        "n_neighbors": "k of the mined k-NN from which each anchor's partner is drawn",
        "n_positives": "mined neighbours drawn per anchor into the batch (p uniform over them; pmi: 1)",
        "propagate_steps": "k-NN walk length for p (1 = pairs only)",
        "debias": "mix with uniform, alpha in [0, 1]",
        "debias_side": "p, q or both",
        "exclude_self": "drop j = i from q, as p does (consistent self-pairs)",
        "same_sample_positive": "a sample drawn twice into a batch is its own positive in p",
        "ema_teacher": "EMA momentum of a teacher head for q's second factor (none: no teacher)",
        "beta": "beta of TEMI's beta-PMI (loss=pmi)",
        "n_steps": "optimiser steps (default max(2000, 30 n / batch_size), whole passes)",
        "batch_size": "anchors per batch (each with one neighbour)",
        "lr": "Adam learning rate",
        "schedule": "learning rate: step (halved at 1/3 and 2/3 of the steps), cosine or none",
        "optimizer": "adam or adamw (decoupled weight decay, TEMI's)",
        "weight_decay": "weight decay of the optimiser",
        "kmeans_init": "k-means restarts of the baseline (0: no k-means baseline)",
    }
    pca_components: int | None = None
    n_clusters: int | None = None
    divergence: str = "tv"
    loss: str = "icon"
    head: str = "linear"
    head_input: str = "standardize"
    n_heads: int = 10
    n_neighbors: int = 20
    n_positives: int = 1
    propagate_steps: int = 1
    debias: float = 0.0
    debias_side: str = "p"
    exclude_self: bool = False
    same_sample_positive: bool = False
    ema_teacher: float | None = None
    beta: float = 0.6
    n_steps: int | None = None
    batch_size: int = 256
    lr: float = 1e-2
    schedule: str = "step"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    kmeans_init: int = 10


@dataclass
class ClusterResult:
    metrics: dict
    assignments: np.ndarray
    history: list[dict]


def _features(dataset, config) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) as (n, d) arrays. A float16 table (an extract folder, memory-mapped) stays
    as it is: rows are made float32 only when a batch uses them."""

    def flat(x):
        return x if x.dtype == np.float16 and x.ndim == 2 else as_float(x).reshape(len(x), -1)

    train, test = flat(dataset.x_train), flat(dataset.x_test)
    if config.pca_components and train.shape[1] > config.pca_components:
        from sklearn.decomposition import PCA

        pca = PCA(config.pca_components, random_state=0).fit(train)
        train, test = (
            pca.transform(train).astype(np.float32),
            pca.transform(test).astype(np.float32),
        )
    return train, test


def _check(config: ClusterConfig, n_train: int, k: int) -> None:
    if config.loss not in ("icon", "pmi"):
        raise ValueError(f"loss must be 'icon' or 'pmi', got {config.loss!r}")
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
    if config.schedule not in ("step", "cosine", "none"):
        raise ValueError(f"schedule must be step, cosine or none, got {config.schedule!r}")
    if not 1 <= config.n_positives <= config.n_neighbors:
        raise ValueError(
            f"n_positives must be in [1, n_neighbors={config.n_neighbors}], got {config.n_positives}"
        )
    if config.loss == "pmi" and config.n_positives != 1:
        raise ValueError("loss=pmi trains on pairs: n_positives must be 1")
    if config.n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {config.n_heads}")
    if config.ema_teacher is not None and not 0.0 <= config.ema_teacher < 1.0:
        raise ValueError(f"ema_teacher momentum must be in [0, 1), got {config.ema_teacher}")


def run(
    config: ClusterConfig, out: str | Path | None = None, resume: bool = False, verbose: bool = True
) -> ClusterResult:
    """Train the head(s) on the train split, then cluster the evaluation split."""
    device, dataset, out, verbose = begin(config, out, verbose)
    train_x, test_x = _features(dataset, config)
    k = config.n_clusters or dataset.n_classes
    _check(config, len(train_x), k)
    seed_everything(config.seed)
    standardize = Standardize.fit_rows(train_x)
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
    mining_time = time.perf_counter() - started
    prepare = {"standardize": standardize, "l2": L2Normalize(), "none": nn.Identity()}[
        config.head_input
    ]
    model = nn.Sequential(
        prepare, ClusterHead(train_x.shape[1], k, config.n_heads, config.head)
    ).to(device)
    teacher = copy.deepcopy(model).requires_grad_(False) if config.ema_teacher is not None else None
    icon = ClusterLoss(
        config.divergence,
        debias=config.debias,
        debias_side=config.debias_side,
        exclude_self=config.exclude_self,
        propagate_steps=config.propagate_steps,
        n_neighbors=config.n_neighbors,
    )
    pmi = nn.ModuleList(PMI(k, beta=config.beta) for _ in range(config.n_heads)).to(device)
    # a memory-mapped table is read a batch at a time; anything else is held on the device
    x_all = train_x if isinstance(train_x, np.memmap) else torch.as_tensor(train_x).to(device)
    knn = torch.as_tensor(neighbors)
    n = len(train_x)
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    head_losses = torch.zeros(config.n_heads)
    head_counts = [0]

    def batches(generator):
        order = torch.randperm(n, generator=generator)
        # n_positives distinct neighbours per anchor, drawn uniformly from its n_neighbors
        if config.n_positives == 1:
            choice = torch.randint(0, config.n_neighbors, (n, 1), generator=generator)
        else:
            choice = torch.rand(n, config.n_neighbors, generator=generator).argsort(dim=1)
        partners = knn[order[:, None], choice[:, : config.n_positives]]
        return list(
            zip(
                torch.tensor_split(order, steps_per_epoch),
                torch.tensor_split(partners, steps_per_epoch),
            )
        )

    def loss_fn(item):
        anchors, partners = item  # (b,), (b, n_positives)
        index = torch.cat([anchors, partners.T.flatten()])
        if isinstance(x_all, np.memmap):
            x = torch.from_numpy(np.asarray(x_all[index.numpy()], dtype=np.float32)).to(device)
        else:
            x = x_all[index.to(device)].float()
        index = index.to(device)
        logits = model(x).float()  # (heads, 2 * batch, k)
        teacher_logits = teacher(x).float() if teacher is not None else None
        if config.loss == "pmi":
            half = len(anchors)
            t = teacher_logits if teacher_logits is not None else logits.detach()
            losses = torch.stack(
                [
                    pmi[h](logits[h, :half], logits[h, half:], t[h, :half], t[h, half:])
                    for h in range(config.n_heads)
                ]
            )
        else:
            losses = icon(
                logits,
                torch.arange(len(anchors), device=device).repeat(config.n_positives + 1),
                teacher_logits,
                sample_index=index if config.same_sample_positive else None,
                features=standardize(x) if config.propagate_steps > 1 else None,
            )
        head_losses.add_(losses.detach().cpu())
        head_counts[0] += 1
        return losses.mean()

    def ema_update():
        if teacher is None:
            return
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), model.parameters()):
                t.mul_(config.ema_teacher).add_(s.detach(), alpha=1 - config.ema_teacher)

    n_steps = config.n_steps or max(2000, math.ceil(30 * n / batch))
    epochs = math.ceil(n_steps / steps_per_epoch)  # whole passes over the anchors
    train_config = TrainConfig(
        epochs=epochs,
        lr=config.lr,
        seed=config.seed,
        schedule=config.schedule,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        step_epochs=epochs / 3,
        step_gamma=0.5,
    )
    state = {"pmi": pmi} | ({"teacher": teacher} if teacher is not None else {})
    started = time.perf_counter()

    def batches_with_reset(generator):  # per-head losses are summed over the current epoch only
        head_losses.zero_()
        head_counts[0] = 0
        return batches(generator)

    history = fit(
        model,
        batches_with_reset,
        loss_fn,
        train_config,
        device=device,
        out_dir=out,
        resume=resume,
        state_modules=state,
        after_step=ema_update,
        desc=f"cluster[{config.divergence if config.loss == 'icon' else 'pmi'}]",
        verbose=verbose,
        identity=identity(config),
    )
    # the loop's clock, carried across --resume segments (not only this segment's)
    train_time = history[-1]["time"] if history else time.perf_counter() - started
    if not is_main():  # the other ranks helped train; rank 0 evaluates and writes
        return ClusterResult({}, np.zeros(0, dtype=np.int64), history)
    best_head = int(torch.argmin(head_losses / max(head_counts[0], 1))) if head_counts[0] else 0
    evaluate_on_test = dataset.has_test_split
    eval_x = test_x if evaluate_on_test else train_x
    eval_y = dataset.y_test if evaluate_on_test else dataset.y_train
    with torch.no_grad():
        model.eval()
        eval_logits = torch.cat(
            [
                model(torch.from_numpy(np.asarray(eval_x[i : i + 8192], np.float32)).to(device))[
                    best_head
                ].cpu()
                for i in range(0, len(eval_x), 8192)
            ]
        )
    assignments = eval_logits.argmax(1).numpy()
    baseline = {}
    kmeans_assign = np.zeros(0, dtype=np.int64)
    if config.kmeans_init > 0:  # 0 skips the baseline (hours for 1000 clusters of 1.28M points)
        from sklearn.cluster import KMeans

        kmeans = KMeans(k, n_init=config.kmeans_init, random_state=config.seed)
        kmeans.fit(standardize(torch.from_numpy(np.asarray(train_x, np.float32))).numpy())
        kmeans_assign = kmeans.predict(
            standardize(torch.from_numpy(np.asarray(eval_x, np.float32))).numpy()
        )
        baseline = {
            "kmeans_acc": metrics.hungarian_accuracy(eval_y, kmeans_assign),
            "kmeans_nmi": metrics.nmi(eval_y, kmeans_assign),
            "kmeans_ari": metrics.adjusted_rand(eval_y, kmeans_assign),
            "kmeans_cluster_size_entropy": metrics.cluster_size_entropy(kmeans_assign, k),
        }
    epochs_run = max(h["epoch"] for h in history) + 1
    result = {
        "acc": metrics.hungarian_accuracy(eval_y, assignments),
        "nmi": metrics.nmi(eval_y, assignments),
        "ari": metrics.adjusted_rand(eval_y, assignments),
        **baseline,
        "clusters_used": int(len(np.unique(assignments))),
        "cluster_size_entropy": metrics.cluster_size_entropy(assignments, k),
        "best_head": best_head,
        "train_time_s": train_time,
        "epoch_time_s": history[-1]["time"] / epochs_run,
        "step_time_s": history[-1]["time"] / (epochs_run * steps_per_epoch),
        "n_steps": epochs_run * steps_per_epoch,
        "mining_time_s": mining_time,
        **(
            {"peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}
            if device.type == "cuda"
            else {}
        ),
        "neighbors_from_cache": from_cache,
        "evaluated_on": "test" if evaluate_on_test else "train",
    }
    if out is not None:
        write_csv(history, out / "history.csv")
        np.savez(out / "assignments.npz", clusters=assignments, labels=eval_y, kmeans=kmeans_assign)
        report.plot_confusion(
            eval_y,
            assignments,
            dataset.classes,
            out / "confusion.png",
            f"{dataset.name}: {config.loss} {config.divergence}, acc {result['acc']:.3f}",
        )
        report.save_json(result, out / "metrics.json")  # last: a sweep counts the run finished
    if verbose:
        print(
            " ".join(
                f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                for key, value in result.items()
            )
        )
    return ClusterResult(result, assignments, history)
