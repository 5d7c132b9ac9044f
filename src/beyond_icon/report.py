"""Figures and tables: embeddings coloured by class, gradient-norm curves, Markdown tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_confusion",
    "plot_embedding",
    "plot_embedding_grid",
    "plot_grad_norm",
    "plot_training",
    "save_json",
]


def save_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _scatter(
    ax,
    embedding: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    title: str,
    legend: bool = True,
) -> None:
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    size = max(1.0, min(12.0, 6000.0 / max(len(embedding), 1)))
    for c, name in enumerate(classes):
        mask = labels == c
        if mask.any():
            ax.scatter(
                embedding[mask, 0],
                embedding[mask, 1],
                s=size,
                color=cmap(c % cmap.N),
                label=name,
                alpha=0.8,
                linewidths=0,
            )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        ax.legend(
            markerscale=max(1.0, 8.0 / size),
            fontsize=7,
            loc="best",
            frameon=False,
            ncol=1 if len(classes) <= 10 else 2,
        )


def plot_embedding(
    embedding, labels, classes: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """A 2-D embedding, one colour per class, with a legend."""
    embedding, labels = np.asarray(embedding), np.asarray(labels)
    if embedding.shape[1] < 2:
        raise ValueError("plotting an embedding needs at least 2 components")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    _scatter(ax, embedding, labels, classes, title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_embedding_grid(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    path: str | Path,
    title: str = "",
) -> None:
    """Several 2-D embeddings side by side: ``panels`` of (title, embedding, labels)."""
    fig = _embedding_grid_figure(panels, classes, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


_LEGEND_INCHES = 1.6  # the class legend's strip at the right of a grid, whatever its panels


def _embedding_grid_figure(panels, classes: Sequence[str], title: str = ""):
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    width = 3.6 * cols + _LEGEND_INCHES  # one panel too: its legend beside it, not on it
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.4 * rows + 0.3), squeeze=False)
    for ax, (name, emb, lab) in zip(axes.flat, panels):
        _scatter(ax, np.asarray(emb), np.asarray(lab), classes, name, legend=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=7, frameon=False, markerscale=3)
    if title:
        fig.suptitle(title, fontsize=11 if cols > 1 else 9)
    fig.tight_layout(rect=(0, 0, 1 - _LEGEND_INCHES / width, 1))
    return fig


def plot_grad_norm(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Gradient norm per step (log scale), one curve per run, epoch-1 boundary marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["grad_norm"] for h in history], label=name, linewidth=0.9)
    first = next(iter(histories.values()))
    epoch_one = [h["step"] for h in first if h["epoch"] == 0]
    if epoch_one:
        ax.axvline(
            epoch_one[-1], color="grey", linestyle=":", linewidth=0.8, label="end of epoch 1"
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_training(history: list[dict], path: str | Path, title: str = "") -> None:
    """Loss, gradient norm and learning rate per step."""
    steps = [h["step"] for h in history]
    keys = [k for k in ("loss", "grad_norm", "lr") if history and k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [h[key] for h in history], linewidth=0.9)
        ax.set_xlabel("step")
        ax.set_title(key.replace("_", " "), fontsize=10)
        if key == "grad_norm":
            ax.set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(
    labels, clusters, classes: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Class x cluster counts, clusters ordered by their Hungarian match to the classes."""
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    n_clusters = max(int(clusters.max()) + 1, len(classes))
    counts = np.zeros((len(classes), n_clusters), dtype=np.int64)
    np.add.at(counts, (labels, clusters), 1)
    rows, cols = linear_sum_assignment(-counts)
    order = list(cols[np.argsort(rows)]) + [c for c in range(n_clusters) if c not in cols]
    counts = counts[:, order]
    # 0.45 inch a cell up to 40 cells a side, then the figure stops growing (1,000 clusters
    # would be a 54,000-pixel square) and the labels give way to the matrix
    width = 1.2 + 0.45 * min(n_clusters, 40)
    height = 1.0 + 0.45 * min(len(classes), 40)
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(counts, cmap="Blues", aspect="auto", interpolation="nearest")
    if len(classes) <= 40:
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    if n_clusters <= 40:
        ax.set_xticks(range(n_clusters), [str(c) for c in order], fontsize=7)
    ax.set_xlabel("cluster (matched order)")
    ax.set_ylabel("class")
    if n_clusters <= 30:
        top = counts.max()
        for (i, j), v in np.ndenumerate(counts):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v > 0.6 * top else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
