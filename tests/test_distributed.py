"""Two gloo processes on the CPU reproduce single-process training on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port as _free_port
from conftest import torchrun as _torchrun

from beyond_icon import methods
from beyond_icon.distributed import all_gather_with_grad, all_reduce_sum, world

SIZES = (5, 7)  # unequal local batches on purpose (the gather pads)
FITTED_BATCH = torch.arange(0, 36, 3)  # 12 distinct indices into the 40 fitted points


def _case(name):
    """(loss module, inputs of the global batch, function (module, inputs, rows) -> loss)."""
    gen = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    if name == "supcon":
        return methods.SupCon("jsd", metric="euclidean"), lambda m, z, r: m(z[r], labels[r]), x
    if name == "supcon_cosine_kl":
        return (
            methods.SupCon("kl", metric="cosine", temperature=0.2),
            lambda m, z, r: m(z[r], labels[r]),
            x,
        )
    if name == "simclr":
        x2 = torch.randn(n, 6, generator=gen, dtype=torch.float64)
        return methods.SimCLR("tv", temperature=0.3), None, torch.cat([x, x2], 1)
    if name == "cluster":
        return (methods.ClusterLoss("hellinger", debias=0.1, debias_side="both"), None, x)
    if name == "cluster_walks":  # p walked along the k-NN graph of the whole (gathered) batch
        return (
            methods.ClusterLoss("jsd", propagate_steps=2, n_neighbors=3, neighbor_mix=0.5),
            None,
            x,
        )
    if name == "cluster_mixed":  # the batch's k-NN mixed into p, merged-columns path
        return (methods.ClusterLoss("tv", n_neighbors=3, neighbor_mix=0.5), None, x)
    if name == "cluster_merged":  # the merged-columns path, two heads, same-sample positives
        return (  # and the batch's k-NN in p, each process searching its own rows
            methods.ClusterLoss(
                "tv",
                debias=0.1,
                debias_side="q",
                exclude_self=True,
                neighbor_mix=0.5,
                n_neighbors=3,
            ),
            None,
            x,
        )
    if name == "sne":
        inputs = torch.randn(n, 9, generator=gen, dtype=torch.float64)
        return methods.SNE("jsd", perplexity=3.0), None, torch.cat([x, inputs], 1)
    if name == "tsne_fitted":  # p fitted once on 40 points; the batch holds 12 of them
        import tempfile

        from beyond_icon.affinity import PerplexityAffinity

        inputs = torch.randn(40, 9, generator=gen, dtype=torch.float64)
        with tempfile.TemporaryDirectory() as cache:
            affinity = PerplexityAffinity(3.0, n_neighbors=5, cache_dir=cache).fit(inputs.numpy())
        # q over the train split: per-row weights (n - 1 - k_i) / m_i across the shards
        loss = methods.TSNE("tv", perplexity=3.0, affinity=affinity, q_scope="global")
        return loss, None, x
    raise ValueError(name)


def _loss(name, loss, model, x, rows_list):
    """The loss of the batch made of the given row ranges (one range: one process's share)."""
    if name.startswith("supcon"):
        labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
        index = torch.cat([torch.arange(r.start, r.stop) for r in rows_list])
        return loss(model(x[index]), labels[index])
    if name == "simclr":
        index = torch.cat([torch.arange(r.start, r.stop) for r in rows_list])
        return loss(model(x[index, :6]), model(x[index, 6:]))
    if name == "cluster":
        # each share holds whole pairs: ids local to the share, made distinct across shares
        parts = [torch.arange(r.start, r.stop) for r in rows_list]
        index = torch.cat(parts)
        pair = torch.cat([torch.arange(len(p)) // 2 + 100 * i for i, p in enumerate(parts)])
        logits = model(x[index])
        return loss(logits, pair, teacher_logits=logits.detach() * 0.5)
    if name in ("cluster_walks", "cluster_mixed"):
        parts = [torch.arange(r.start, r.stop) for r in rows_list]
        index = torch.cat(parts)
        pair = torch.cat([torch.arange(len(p)) // 2 + 100 * i for i, p in enumerate(parts)])
        return loss(model(x[index]), pair, features=x[index])
    if name == "cluster_merged":
        parts = [torch.arange(r.start, r.stop) for r in rows_list]
        index = torch.cat(parts)
        pair = torch.cat([torch.arange(len(p)) // 2 + 100 * i for i, p in enumerate(parts)])
        logits = model(x[index])
        heads = torch.stack([logits, 2.0 * logits.flip(1)])
        return loss(
            heads, pair, heads.detach() * 0.5, sample_index=index % 4, features=x[index]
        ).sum()
    if name == "sne":
        index = torch.cat([torch.arange(r.start, r.stop) for r in rows_list])
        return loss(x[index, 6:], model(x[index, :6]))
    if name == "tsne_fitted":  # negatives weighted (n - 1 - k_i) / m_i != 1: 40 points, 12 here
        index = torch.cat([torch.arange(r.start, r.stop) for r in rows_list])
        return loss(None, model(x[index]), indices=FITTED_BATCH[index], exaggeration=2.0)
    raise ValueError(name)


def _worker(rank, world_size, port, names, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        shares = [slice(0, SIZES[0]), slice(SIZES[0], sum(SIZES))]
        for name in names:
            loss, _, x = _case(name)
            torch.manual_seed(1)
            model = torch.nn.Linear(6, 4).double()
            value = _loss(name, loss, model, x, [shares[rank]])
            value.backward()
            grads = [all_reduce_sum(p.grad) / world_size for p in model.parameters()]
            mean_value = all_reduce_sum(value.detach()) / world_size
            if rank == 0:
                torch.manual_seed(1)
                single = torch.nn.Linear(6, 4).double()
                loss.gather = False
                reference = _loss(name, loss, single, x, shares)
                reference.backward()
                ours = torch.cat([g.flatten() for g in grads])
                theirs = torch.cat([p.grad.flatten() for p in single.parameters()])
                # relative to the scale of all gradients (some, e.g. a bias under a
                # translation-invariant kernel, are exactly zero in theory)
                results[name] = (
                    float(mean_value),
                    float(reference.detach()),
                    float((ours - theirs).abs().max() / theirs.abs().max()),
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()


NAMES = [
    "supcon",
    "supcon_cosine_kl",
    "simclr",
    "cluster",
    "cluster_walks",
    "cluster_mixed",
    "cluster_merged",
    "sne",
    "tsne_fitted",
]


@pytest.fixture(scope="module")
def two_process_results():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), NAMES, results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_equal_single_process(two_process_results, name):
    distributed, single, grad_error = two_process_results[name]
    assert distributed == pytest.approx(single, rel=1e-12, abs=1e-14)
    assert grad_error < 1e-10


def test_without_process_group_gather_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    gathered, shard = all_gather_with_grad(x)
    assert gathered is x and shard.rows == slice(0, 4) and shard.world_size == 1
    assert world() == (0, 1)


# ----------------------------------------------------------------------------- under torchrun


SUPCON = [
    "supcon",
    "--data",
    "digits",
    "--n-train",
    "160",
    "--n-test",
    "60",
    "--batch-size",
    "40",
    "--probe-epochs",
    "5",
    "--divergence",
    "jsd",
    "--device",
    "cpu",
    "--quiet",
]


def test_two_process_supcon_writes_what_one_process_writes(tmp_path):
    from beyond_icon.cli import main

    _torchrun([*SUPCON, "--epochs", "1", "--out", str(tmp_path / "two")])
    assert main([*SUPCON, "--epochs", "1", "--out", str(tmp_path / "one")]) == 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    import json

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert 0 <= metrics["knn_acc"] <= 1
    # the same global batches: as many optimiser steps in both runs
    assert len((tmp_path / "two" / "history.csv").read_text().splitlines()) == len(
        (tmp_path / "one" / "history.csv").read_text().splitlines()
    )
    # a checkpoint written by two processes resumes in one
    assert main([*SUPCON, "--epochs", "2", "--resume", "--out", str(tmp_path / "two")]) == 0
    rows = (tmp_path / "two" / "history.csv").read_text().splitlines()[1:]
    assert {row.split(",")[0] for row in rows} == {"0", "1"}


def _mining_worker(rank, world_size, port, results):
    from beyond_icon.neighbors import cached_neighbors

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        import numpy as np

        x = np.random.default_rng(0).normal(size=(101, 5)).astype(np.float32)
        # rank 1 looks in a folder of its own (another node's disk): rank 0 decides for all
        cache = results["cache"] if rank == 0 else results["cache"] + f"-rank{rank}"
        indices, cached = cached_neighbors(x, 4, cache)
        results[rank] = (indices.tolist(), cached)
    finally:
        dist.destroy_process_group()


def test_sharded_mining_equals_single_process(tmp_path):
    import numpy as np

    from beyond_icon.neighbors import mine_neighbors

    results = mp.Manager().dict()
    results["cache"] = str(tmp_path)
    mp.spawn(_mining_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    x = np.random.default_rng(0).normal(size=(101, 5)).astype(np.float32)
    want = mine_neighbors(x, 4).tolist()
    assert results[0] == (want, False) and results[1] == (want, False)
    # again: rank 0 finds its cache and broadcasts it; rank 1's own folder is empty
    mp.spawn(_mining_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0] == (want, True) and results[1] == (want, True)


def test_two_process_cluster_picks_the_one_process_head(tmp_path):
    """The best head is chosen on the global batch's loss, not rank 0's share of it."""
    import json

    from beyond_icon.cli import main

    args = [
        "cluster",
        "--data",
        "simplex:3",
        "--n-steps",
        "4",
        "--seed",
        "1",
        "--kmeans-init",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    _torchrun([*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert two["best_head"] == one["best_head"]
    assert two["acc"] == pytest.approx(one["acc"])


def test_two_process_sne_trains_what_one_process_trains(tmp_path):
    """Each rank adds its rows' part of the whole batch's input noise (the default 0.3), so
    two processes take the steps one process takes: the same loss and gradient norm at every
    step, to float rounding. Before, every rank drew noise for its own rows from a generator
    seeded alike, so the ranks' rows shared their draws, and the losses differed at every
    step (by up to 2.6% here). The embeddings are not compared: Adam turns rounding in
    near-zero gradients into steps of a whole learning rate (0.3% of the layout here, also
    without noise)."""
    import csv

    import numpy as np

    from beyond_icon.cli import main

    args = ["sne", "--data", "digits", "--n-train", "300", "--n-test", "60", "--n-steps", "12"]
    args += ["--batch-size", "50", "--perplexity", "10", "--device", "cpu", "--quiet"]
    _torchrun([*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (list(csv.DictReader((tmp_path / r / "history.csv").open())) for r in ("one", "two"))
    assert len(one) == len(two) == 12
    for column in ("loss", "grad_norm"):
        np.testing.assert_allclose(
            [float(row[column]) for row in two], [float(row[column]) for row in one], rtol=1e-5
        )
