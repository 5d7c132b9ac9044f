"""Where parametric SNE loses to openTSNE: the train embedding, or the map to new points?

Fits ParametricSNE on Fashion-MNIST 10k (the bench_sne split) and prints the leave-one-out
5-NN accuracy of the train embedding beside the test 5-NN accuracy (test points mapped by the
network, train embedding as reference). ``--openTSNE`` adds openTSNE's figures, ``--inputs``
those of the PCA-50 inputs. ``--hidden 512,512,512`` sets the MLP's widths (the estimator's
``hidden``); two patches not exposed as estimator parameters can be tried: ``--batch-norm``
and ``--output-scale 10`` (a fixed factor on the network's output, i.e. a larger step in the
embedding). ``--cnn-width W``
trains the estimator's small CNN (``backbone="cnn"``) on the 28 x 28 images with W channels in
its first stage (the estimator's is 32, for a GPU; 8 or 16 fit 2 CPU cores), p still on PCA-50.
Each ``--set NAME=VALUE`` is a ParametricSNE parameter (JSON value).

``--free-embedding`` optimises the same objective without a network: the train embedding is a
free (n, 2) parameter (SparseAdam, lr ``--free-lr``, cosine decay, ``--free-steps`` steps),
with the same fitted p, batch sampler, TSNE preset and early exaggeration as the estimator.
It shows how far the loss itself can go, apart from the map. ``--free-init openTSNE`` (or
``ours``) starts the table from openTSNE's train embedding (or the estimator's, with its
``--set`` options) instead of a small PCA, without early exaggeration, at an lr of
``--free-lr-knn`` times the start's mean distance to its 5 nearest neighbours, and prints the
train 5-NN at each quarter of the steps: whether the objective, on its batches, keeps, improves
or loses that embedding's local structure. ``--regress-free`` then fits the
estimator's network (its PCA layer, MLP widths from ``--hidden``, input noise from ``--set
input_noise=...``, the same on every feature: ``input_noise_power=0``) to that free embedding by least squares, Adam at the estimator's lr with
cosine decay for ``--regress-steps`` steps of 512 points, and reports the network's train and
test 5-NN: whether a network can represent the free embedding, and how that map generalises.

    python benchmarks/sne_train_gap.py --openTSNE --inputs
    python benchmarks/sne_train_gap.py --set n_steps=12000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import beyond_icon.parametric_sne as parametric_sne
from beyond_icon import data, metrics
from beyond_icon.data import as_float


def leave_one_out_knn(embedding: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Accuracy of the majority label among each point's k nearest other points."""
    index = KNeighborsClassifier(k + 1).fit(embedding, labels)
    neighbours = index.kneighbors(embedding, return_distance=False)[:, 1:]
    votes = np.array(
        [np.bincount(row, minlength=labels.max() + 1).argmax() for row in labels[neighbours]]
    )
    return float((votes == labels).mean())


class _Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def free_embedding(
    x_train: np.ndarray,
    steps: int,
    lr: float,
    seed: int = 0,
    q_scope: str = "global",
    start: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """The estimator's objective optimised over a free (n, 2) embedding instead of a network.

    From ``start`` (an (n, 2) embedding of ``x_train``) if given, without early exaggeration,
    printing the train 5-NN (LOO, with ``labels``) at each quarter of the steps (the reported
    fit time includes those evaluations); otherwise from a small PCA with the estimator's early
    exaggeration."""
    import math

    from beyond_icon import value_checks
    from beyond_icon.affinity import PerplexityAffinity
    from beyond_icon.methods import TSNE
    from beyond_icon.sampling import NeighborBatchSampler

    torch.manual_seed(seed)
    inputs = PCA(50, random_state=seed).fit_transform(x_train).astype(np.float32)
    affinity = PerplexityAffinity(30.0).fit(inputs)
    sampler = NeighborBatchSampler(affinity, 256)
    loss = TSNE("kl", 30.0, affinity=affinity, q_scope=q_scope)
    table = torch.nn.Embedding(len(inputs), 2, sparse=True)
    with torch.no_grad():  # PCA initialisation, small, or the given embedding
        init = inputs[:, :2] / inputs[:, 0].std() * 1e-2 if start is None else start
        table.weight.copy_(torch.as_tensor(np.asarray(init, dtype=np.float32)))
    optimizer = torch.optim.SparseAdam(table.parameters(), lr=lr)
    generator, step = torch.Generator().manual_seed(seed), 0
    quarters = {round(steps * q / 4) for q in (1, 2, 3, 4)} - {0}
    with value_checks(False):
        while step < steps:
            for index in sampler.epoch(generator):
                if step >= steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                early = start is None and step < 0.25 * steps
                exaggeration = 12.0 if early else 1.0
                value = loss(None, table(index), indices=index, exaggeration=exaggeration)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                step += 1
                if start is not None and labels is not None and step in quarters:
                    accuracy = leave_one_out_knn(table.weight.detach().numpy(), labels)
                    print(f"  step {step}: train 5-NN (LOO) {accuracy:.3f}", flush=True)
    return table.weight.detach().numpy()


def regress(x_train, x_test, target, hidden, noise, steps, lr, seed=0):
    """The estimator's plain MLP (its PCA layer, no cells) fitted to ``target`` (n, 2) by
    least squares; returns its embeddings of the train and test points."""
    torch.manual_seed(seed)
    estimator = parametric_sne.ParametricSNE()
    x = torch.as_tensor(x_train, dtype=torch.float32)
    projection, _ = estimator._input_space(x)
    body = parametric_sne.MLP(projection.components.shape[0], hidden=hidden, batch_norm=False)
    network = torch.nn.Sequential(
        projection,
        parametric_sne.InputNoise(noise),
        body,
        torch.nn.Linear(body.feature_dim, 2),
    )
    y = torch.as_tensor(target, dtype=torch.float32)
    y = (y - y.mean(0)) / y.std()
    optimizer = torch.optim.Adam(network.parameters(), lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (512,), generator=generator)
        loss = (network(x[index]) - y[index]).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    network.eval()
    with torch.no_grad():
        return network(x).numpy(), network(torch.as_tensor(x_test, dtype=torch.float32)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="train and test points")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--hidden", default=None, help="MLP widths, e.g. 512,512,512")
    parser.add_argument("--output-scale", type=float, default=None)
    parser.add_argument("--batch-norm", action="store_true", help="BatchNorm in the MLP")
    parser.add_argument("--openTSNE", action="store_true")
    parser.add_argument("--free-embedding", action="store_true")
    parser.add_argument("--free-steps", type=int, default=4000)
    parser.add_argument("--free-lr", type=float, default=1.0)
    parser.add_argument("--free-init", choices=("pca", "openTSNE", "ours"), default="pca")
    parser.add_argument("--free-lr-knn", type=float, default=0.1, help="see the docstring")
    parser.add_argument("--inputs", action="store_true")
    parser.add_argument("--regress-free", action="store_true", help="see the module docstring")
    parser.add_argument("--regress-steps", type=int, default=4000)
    parser.add_argument("--cnn-width", type=int, default=None, help="see the module docstring")
    args = parser.parse_args()
    dataset = data.load("fashion-mnist").subset(args.n, args.n)
    x_train = np.asarray(as_float(dataset.x_train)).reshape(len(dataset.x_train), -1)
    x_test = np.asarray(as_float(dataset.x_test)).reshape(len(dataset.x_test), -1)
    y_train, y_test = dataset.y_train, dataset.y_test

    def report(name, fit_s, train, test):
        print(
            f"{name}: train 5-NN (LOO) {leave_one_out_knn(train, y_train):.3f}, test 5-NN "
            f"{metrics.knn_accuracy(train, y_train, test, y_test, 5):.3f}, fit {fit_s:.1f} s",
            flush=True,
        )

    if args.inputs or args.openTSNE:
        pca = PCA(50, random_state=0).fit(x_train)
        p_train, p_test = pca.transform(x_train), pca.transform(x_test)
        if args.inputs:
            report("PCA-50 inputs", 0.0, p_train, p_test)
        if args.openTSNE:
            import openTSNE

            started = time.perf_counter()
            embedding = openTSNE.TSNE(n_jobs=torch.get_num_threads(), random_state=0).fit(p_train)
            seconds = time.perf_counter() - started
            report("openTSNE", seconds, np.asarray(embedding), embedding.transform(p_test))
    if args.free_embedding:
        started = time.perf_counter()
        settings = dict(item.partition("=")[::2] for item in args.set)
        ignored = sorted(set(settings) - {"q_scope", "input_noise"})
        if (
            ignored
            or args.batch_norm
            or args.output_scale
            or (args.hidden and not args.regress_free)
        ):
            parser.error(
                "--free-embedding optimises KL with the estimator's defaults: only q_scope and "
                "input_noise may be --set (and --hidden with --regress-free), not "
                + ", ".join(ignored or ["--hidden / --batch-norm / --output-scale"])
            )
        scope = json.loads(settings.get("q_scope", '"global"'))  # KL's, as the estimator's auto
        start, lr = None, args.free_lr
        if args.free_init != "pca":
            if args.free_init == "openTSNE":
                import openTSNE

                p_train = PCA(50, random_state=0).fit_transform(x_train)
                threads = torch.get_num_threads()
                start = np.asarray(openTSNE.TSNE(n_jobs=threads, random_state=0).fit(p_train))
            else:
                overrides = {k: json.loads(v) for k, v in settings.items()}
                start = parametric_sne.ParametricSNE(**overrides).fit(x_train).embedding_
            nearest = NearestNeighbors(n_neighbors=6).fit(start).kneighbors(start)[0][:, 1:]
            lr = args.free_lr_knn * float(nearest.mean())
            print(
                f"start: {args.free_init}'s train embedding, train 5-NN (LOO) "
                f"{leave_one_out_knn(start, y_train):.3f}; lr {lr:.4g}",
                flush=True,
            )
            started = time.perf_counter()
        embedding = free_embedding(
            x_train, args.free_steps, lr, q_scope=scope, start=start, labels=y_train
        )
        seconds = time.perf_counter() - started
        print(
            f"free embedding ({args.free_init} start, {args.free_steps} steps, lr {lr:.4g}): "
            "train 5-NN (LOO) "
            f"{leave_one_out_knn(embedding, y_train):.3f}, fit {seconds:.1f} s",
            flush=True,
        )
        if args.regress_free:
            default = ",".join(map(str, parametric_sne.ParametricSNE().hidden))
            hidden = tuple(int(v) for v in (args.hidden or default).split(","))
            noise = float(json.loads(settings.get("input_noise", "0.3")))
            started = time.perf_counter()
            train, test = regress(
                x_train, x_test, embedding, hidden, noise, args.regress_steps, 4e-3
            )
            report(
                f"network {hidden} (input noise {noise:g}) regressed onto the free embedding "
                f"for {args.regress_steps} steps",
                time.perf_counter() - started,
                train,
                test,
            )
        return
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value)
    if args.hidden:
        overrides["hidden"] = [int(v) for v in args.hidden.split(",")]
    if args.batch_norm:

        class NormMLP(parametric_sne.MLP):  # subclasses: the estimator checks isinstance(MLP)
            def __init__(self, width, hidden=(128, 128), batch_norm=False):
                super().__init__(width, hidden=hidden, batch_norm=True)

        class NormCellMLP(parametric_sne.CellMLP):
            def __init__(self, width, landmarks, batch_norm=False, **kwargs):
                super().__init__(width, landmarks, batch_norm=True, **kwargs)

        parametric_sne.MLP, parametric_sne.CellMLP = NormMLP, NormCellMLP
    if args.output_scale:
        original_network = parametric_sne.ParametricSNE._network

        def scaled_network(self, *a):  # stem, noise, body, last layer, then the factor
            network = original_network(self, *a)
            network.append(_Scale(args.output_scale))
            return network

        parametric_sne.ParametricSNE._network = scaled_network
    fit_x, transform_x = x_train, x_test
    if args.cnn_width and ("backbone" in overrides or args.hidden or args.batch_norm):
        parser.error("--cnn-width trains the CNN: drop --set backbone, --hidden and --batch-norm")
    if args.cnn_width:
        from beyond_icon import models

        original_backbone = parametric_sne.build_backbone
        parametric_sne.build_backbone = lambda name, shape: (
            models.SmallCNN(shape[0], shape[1], width=args.cnn_width)
            if name == "cnn"
            else original_backbone(name, shape)
        )
        overrides["backbone"] = "cnn"
        fit_x, transform_x = (x.reshape(len(x), 1, 28, 28) for x in (x_train, x_test))
    started = time.perf_counter()
    model = parametric_sne.ParametricSNE(**overrides).fit(fit_x)
    seconds = time.perf_counter() - started
    transform_started = time.perf_counter()
    test_embedding = model.transform(transform_x)
    transform_seconds = time.perf_counter() - transform_started
    label = ", ".join(
        [f"{k}={v}" for k, v in overrides.items()]
        + ([f"CNN width {args.cnn_width}"] if args.cnn_width else [])
        + (["BatchNorm"] if args.batch_norm else [])
        + ([f"output x {args.output_scale:g}"] if args.output_scale else [])
    )
    report(
        f"ParametricSNE ({label or 'defaults'}; transform {transform_seconds:.3f} s)",
        seconds,
        model.embedding_,
        test_embedding,
    )


if __name__ == "__main__":
    main()
