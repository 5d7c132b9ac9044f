"""Parametric SNE (ours, several divergences, default settings) against openTSNE and UMAP.

Each method embeds the train split and maps the test split (ours with its network, openTSNE
and UMAP with their ``transform``); the same metrics are taken on the test split: 5-NN accuracy
(train embedding as reference), trustworthiness (k = 10, w.r.t. the PCA-50 inputs), the test
embedding's pieces (``metrics.embedding_pieces``: how many, and the largest one's share of the
points; many small pieces are clumps that the two neighbourhood scores do not see), wall time
of fitting and of transforming the test split. One run, one table, every method on the same
machine with the same threads (ours on ``--device``, the CPU by default). Our fit time
includes our PCA and a fresh neighbour search; the baselines' fit and transform times include
the PCA-50 projection they run on (scikit-learn's, fitted inside the timed fit: the same
projection as the one trustworthiness is measured in). Each method's transform of the test
split is called ``--transform-calls`` times (5 by default) and the table shows the median
time: one call's time moves by a third or more between calls (UMAP's first call includes
numba's compilation); the metrics are the first call's.

    pip install -e ".[bench]"
    python benchmarks/bench_sne.py --data fashion-mnist --n-train 10000 --n-test 10000

Each ``--variant "NAME=VALUE NAME=VALUE"`` adds rows of ours with those parameters on top of
``--set`` (for the divergences of ``--variant-divergences``, the first of ``--divergences`` by
default), after the default rows and the baselines: several settings compared in the same run.
``--json`` is rewritten after every row, so a run cut short keeps what it measured; so is
``--plot``, a PNG of every method's test embedding side by side (coloured by class, each panel
titled with its 5-NN accuracy).
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

from beyond_icon import data, metrics
from beyond_icon.data import as_float
from beyond_icon.parametric_sne import ParametricSNE
from beyond_icon.report import plot_embedding_grid
from beyond_icon.train import resolve_device


def _regress(x_train, target, x_test, seed, steps=4000):
    """ParametricSNE's plain MLP of before the cells (``n_cells=0, hidden=(256, 256)``: MLP
    256-256 on globally scaled PCA-50, input noise 0.3) fitted to ``target`` by mean squared
    error with Adam."""
    from beyond_icon.models import MLP

    torch.manual_seed(seed)
    xt, xs = torch.as_tensor(x_train).float(), torch.as_tensor(x_test).float()
    mean, scale = xt.mean(0), xt.std()
    y = torch.as_tensor(target).float()
    body = MLP(xt.shape[1], hidden=(256, 256), batch_norm=False)
    net = torch.nn.Sequential(body, torch.nn.Linear(body.feature_dim, y.shape[1]))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(xt), (1024,), generator=generator)
        inputs = (xt[index] - mean) / scale
        loss = (net(inputs + 0.3 * torch.randn_like(inputs)) - y[index]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return net((xt - mean) / scale).numpy(), net((xs - mean) / scale).numpy()


def _short(method: str) -> str:
    """A row's method as a panel title: ``ours (kl)``, ``openTSNE``, ``UMAP``."""
    if method.startswith("beyond-icon ParametricSNE ("):
        inside = method[len("beyond-icon ParametricSNE (") : -1]
        divergence, _, settings = inside.partition("; ")
        return f"ours ({divergence})" + ("" if settings == "defaults" else f", {settings}")
    return method.split(" (")[0]


def _parse_settings(items: list[str]) -> dict:
    """``NAME=VALUE`` items as a dict; each value JSON, else a plain string."""
    settings = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value  # a plain string, e.g. neighbor_method=nndescent
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--divergences", default="kl,tv,jsd,hellinger")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a non-default ParametricSNE parameter (JSON value), shown in the table",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='"NAME=VALUE ..."',
        help="extra rows of ours with these parameters (space-separated), on top of --set",
    )
    parser.add_argument("--variant-divergences", default=None, help="default: the first one")
    parser.add_argument("--device", default="cpu", help="ours: cpu, cuda, cuda:N or auto")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--skip-umap", action="store_true", help="openTSNE only as baseline")
    parser.add_argument(
        "--regression-ceiling",
        action="store_true",
        help="also regress our MLP onto openTSNE's train embedding (how well any parametric "
        "map of this size generalises)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--transform-calls",
        type=int,
        default=5,
        help="transform the test split this many times; the median time is reported",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="also draw every method's test embedding into this PNG, one panel each",
    )
    args = parser.parse_args()
    if args.transform_calls < 1:
        parser.error(f"--transform-calls must be at least 1, got {args.transform_calls}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():  # before the fits, not after
            parser.error(f"{flag}: no folder {path.parent}")
    overrides = _parse_settings(args.set)
    variants = [_parse_settings(variant.split()) for variant in args.variant]
    needed = [] if args.skip_baselines else ["openTSNE"] + ([] if args.skip_umap else ["umap"])
    try:  # only what the run uses: ours alone needs neither
        baselines = {name: importlib.import_module(name) for name in needed}
    except ImportError as error:
        raise SystemExit(
            f"the baselines need the bench extra (pip install -e '.[bench]'): {error}"
        ) from None

    dataset = data.load(args.data).subset(args.n_train, args.n_test)
    x_train = as_float(dataset.x_train).reshape(len(dataset.x_train), -1)
    x_test = as_float(dataset.x_test).reshape(len(dataset.x_test), -1)
    components = min(50, x_train.shape[1])
    pca = PCA(components, random_state=0).fit(x_train)
    p_train, p_test = pca.transform(x_train), pca.transform(x_test)

    def baseline_inputs() -> tuple[PCA, np.ndarray]:
        """The PCA-50 projection a baseline runs on, fitted afresh inside its timed fit: the
        same projection as ``pca`` (same data, same seed), its time now the baseline's."""
        own = PCA(components, random_state=0).fit(x_train)
        return own, own.transform(x_train)

    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{dataset.describe()}; ours on {device} ({where}); torch threads "
        f"{torch.get_num_threads()}\n",
        flush=True,
    )

    rows, panels = [], []

    def timed(transform, x):
        """The first call's result and the seconds of each of ``--transform-calls`` calls."""
        seconds, result = [], None
        for _ in range(args.transform_calls):
            started = time.perf_counter()
            out = np.asarray(transform(x))
            seconds.append(time.perf_counter() - started)
            result = out if result is None else result
        return result, seconds

    def record(name, fit_seconds, transform_seconds, emb_train, emb_test):
        calls = [float(t) for t in np.atleast_1d(transform_seconds)]
        transform_seconds = float(np.median(calls))
        row = {
            "method": name,
            "fit_s": fit_seconds,
            "transform_s": transform_seconds,
            "transform_calls_s": calls,
            "knn5": metrics.knn_accuracy(emb_train, dataset.y_train, emb_test, dataset.y_test, 5),
            "trustworthiness": metrics.trustworthiness(p_test, emb_test, k=10),
        }
        # clumps that 5-NN and trustworthiness do not see: the test embedding's pieces
        pieces = metrics.embedding_pieces(emb_test, k=min(10, len(emb_test) - 1))
        row["pieces"] = int(pieces.max()) + 1
        row["largest_piece"] = float(np.bincount(pieces).max() / len(pieces))
        rows.append(row)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
        if args.plot is not None:
            title = textwrap.fill(f"{_short(name)}: 5-NN {row['knn5']:.3f}", 40)  # a panel wide
            panels.append((title, emb_test, dataset.y_test))
            plot_embedding_grid(
                panels,
                dataset.classes,
                args.plot,
                title=f"{args.data}: test split ({len(dataset.x_test)} points), seed {args.seed}",
            )
        each = "" if len(calls) < 2 else " (" + ", ".join(f"{t:.3f}" for t in calls) + ")"
        print(
            f"  {name}: fit {fit_seconds:.1f} s, transform {transform_seconds:.3f} s{each}, "
            f"5-NN {row['knn5']:.3f}, trustworthiness {row['trustworthiness']:.4f}, "
            f"{row['pieces']} pieces (the largest {row['largest_piece']:.1%} of the points)",
            flush=True,
        )

    def ours(divergence: str, settings: dict) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        with tempfile.TemporaryDirectory() as cache:  # every fit searches its neighbours
            est = ParametricSNE(
                divergence=divergence,
                random_state=args.seed,
                device=str(device),
                **{"cache_dir": cache, **settings},
            )
            started = time.perf_counter()
            est.fit(dataset.x_train)  # PCA, neighbours, p and training
            seconds = time.perf_counter() - started
        emb_test, transform_seconds = timed(est.transform, dataset.x_test)
        record(
            f"beyond-icon ParametricSNE ({divergence}; {shown})",
            seconds,
            transform_seconds,
            est.embedding_,
            emb_test,
        )

    for divergence in args.divergences.split(","):
        ours(divergence, overrides)

    if not args.skip_baselines:
        started = time.perf_counter()
        projection, z_train = baseline_inputs()
        tsne = (
            baselines["openTSNE"]
            .TSNE(perplexity=30, n_jobs=-1, random_state=args.seed)
            .fit(z_train)
        )
        seconds = time.perf_counter() - started
        emb_test, transform_seconds = timed(
            lambda x: tsne.transform(projection.transform(x)), x_test
        )
        record(
            "openTSNE (non-parametric; transform for test)",
            seconds,
            transform_seconds,
            np.asarray(tsne),
            emb_test,
        )

        if args.regression_ceiling:
            # How well can our network map unseen points at all? Regress the same MLP (on the
            # same PCA input) onto openTSNE's own train embedding by least squares and map the
            # test split with it: the parametric map's ceiling, whatever the loss.
            started = time.perf_counter()
            emb_train, emb_test = _regress(p_train, np.asarray(tsne), p_test, args.seed)
            record(
                "MLP regressed onto openTSNE's train embedding (the parametric ceiling)",
                time.perf_counter() - started,
                float("nan"),
                emb_train,
                emb_test,
            )

    if not args.skip_baselines and not args.skip_umap:
        started = time.perf_counter()
        projection, z_train = baseline_inputs()
        reducer = baselines["umap"].UMAP(n_neighbors=15, random_state=args.seed)
        emb_train = reducer.fit_transform(z_train)
        seconds = time.perf_counter() - started
        emb_test, transform_seconds = timed(
            lambda x: reducer.transform(projection.transform(x)), x_test
        )
        record("UMAP (transform for test)", seconds, transform_seconds, emb_train, emb_test)

    variant_divergences = (args.variant_divergences or args.divergences.split(",")[0]).split(",")
    for variant in variants:
        for divergence in variant_divergences:
            ours(divergence, overrides | variant)

    print(
        "\n| method | fit time (s) | transform time, test split (s) | 5-NN acc (test) "
        "| trustworthiness (test, k=10) | pieces (test) | largest piece |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        line = (
            f"| {row['method']} | {row['fit_s']:.1f} | {row['transform_s']:.3f} | "
            f"{row['knn5']:.3f} | {row['trustworthiness']:.3f} | {row['pieces']} | "
            f"{row['largest_piece']:.1%} |"
        )
        print(line.replace("| nan |", "| |"))


if __name__ == "__main__":
    main()
