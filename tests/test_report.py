"""Figures and JSON of a run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from beyond_icon import report


def test_save_json_is_atomic_and_sorted(tmp_path):
    report.save_json({"b": 1.5, "a": "x"}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": "x", "b": 1.5} and text.index('"a"') < text.index('"b"')
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("n_classes", [3, 12])
def test_figures_are_written(tmp_path, n_classes):
    rng = np.random.default_rng(0)
    labels = np.arange(60) % n_classes
    classes = [f"c{i}" for i in range(n_classes)]
    embedding = rng.normal(size=(60, 2))
    history = [
        {"epoch": s // 5, "step": s, "loss": 1.0 / (s + 1), "grad_norm": 1.0, "lr": 1e-3}
        for s in range(20)
    ]
    report.plot_embedding(embedding, labels, classes, tmp_path / "e.png", "title")
    panels = [("kl", embedding, labels), ("tv", embedding, labels)]
    report.plot_embedding_grid(panels, classes, tmp_path / "g.png")
    report.plot_grad_norm({"kl": history, "tv": history}, tmp_path / "n.png", "norms")
    report.plot_training(history, tmp_path / "t.png", "training")
    report.plot_confusion(labels, (labels + 1) % n_classes, classes, tmp_path / "c.png", "conf")
    for name in ("e", "g", "n", "t", "c"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_confusion_of_many_clusters_stays_a_bounded_figure(tmp_path):
    """0.45 inch a cluster made 1,000 clusters a 54,000-pixel square (tens of GB) at the end of
    a run; the figure stops growing at 40 cells a side."""
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 300, 3000)
    report.plot_confusion(
        labels, rng.integers(0, 300, 3000), [str(i) for i in range(300)], tmp_path / "c.png"
    )
    with Image.open(tmp_path / "c.png") as image:
        assert max(image.size) < 2500, image.size


@pytest.mark.parametrize("n_panels", [1, 2, 6])
def test_a_grids_legend_and_title_stay_clear_of_its_panels(n_panels):
    """One panel had its legend drawn over it and its title cut at the figure's edges."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    panels = [
        (f"ours ({i}): 5-NN 0.800", rng.normal(size=(200, 2)), labels) for i in range(n_panels)
    ]
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"] + [f"c{i}" for i in range(5)]
    fig = report._embedding_grid_figure(panels, classes, "fashion-mnist: test split, seed 0")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox
    legend = fig.legends[0].get_window_extent(renderer)
    title = fig._suptitle.get_window_extent(renderer)
    panels_right = max(ax.get_window_extent(renderer).x1 for ax in fig.axes if ax.axison)
    assert legend.x0 >= panels_right  # beside the panels, not over them
    assert figure_box.x0 <= title.x0 and title.x1 <= figure_box.x1  # the whole title shown
    assert legend.x1 <= figure_box.x1
    report.plt.close(fig)
