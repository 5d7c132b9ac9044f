"""Presets against the original methods' formulas, written as per-anchor loops in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beyond_icon import divergences, kernels, methods

DIVERGENCES = ["kl", "tv", "jsd", "hellinger", "alpha:0.5", "chi2"]


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def supcon_loop(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Khosla et al. L_out, base temperature = temperature, averaged over anchors."""
    n, total, anchors = len(z), 0.0, 0
    for i in range(n):
        positives = [j for j in range(n) if j != i and y[j] == y[i]]
        if not positives:
            continue
        denom = sum(math.exp(_cos(z[i], z[a]) / temperature) for a in range(n) if a != i)
        total += -sum(
            math.log(math.exp(_cos(z[i], z[p]) / temperature) / denom) for p in positives
        ) / len(positives)
        anchors += 1
    return total / anchors


def test_supcon_kl_cosine_equals_khosla_minus_entropy(rng):
    z, y = rng.normal(size=(14, 5)), rng.integers(0, 3, size=14)
    got = methods.SupCon("kl", metric="cosine", temperature=0.2)(torch.tensor(z), torch.tensor(y))
    entropy = np.mean(
        [math.log(sum(1 for j in range(14) if j != i and y[j] == y[i])) for i in range(14)]
    )
    assert float(got) == pytest.approx(supcon_loop(z, y, 0.2) - entropy, rel=1e-10)


def test_supcon_views_layout(rng):
    """(n, V, d) features with (n,) labels equal the flattened (V n, d) batch."""
    z, y = torch.tensor(rng.normal(size=(6, 2, 4))), torch.tensor(rng.integers(0, 3, size=6))
    loss = methods.SupCon("jsd")
    flat = torch.cat([z[:, 0], z[:, 1]])
    torch.testing.assert_close(loss(z, y), loss(flat, y.repeat(2)))


def test_supcon_euclidean_matches_loop(rng):
    z, y = rng.normal(size=(10, 3)), rng.integers(0, 2, size=10)
    sigma = 0.9
    got = methods.SupCon("hellinger", metric="euclidean", sigma=sigma)(
        torch.tensor(z), torch.tensor(y)
    )
    total = 0.0
    for i in range(10):
        w = np.array(
            [
                math.exp(-np.sum((z[i] - z[j]) ** 2) / (2 * sigma**2)) if j != i else 0
                for j in range(10)
            ]
        )
        q = w / w.sum()
        pos = np.array([1.0 if j != i and y[j] == y[i] else 0.0 for j in range(10)])
        p = pos / pos.sum()
        total += 0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)
    assert float(got) == pytest.approx(total / 10, rel=1e-10)


def test_simclr_kl_equals_nt_xent(rng):
    z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    z, t, n = np.concatenate([z1, z2]), 0.5, 10
    loss = 0.0
    for i in range(n):
        partner = (i + 5) % n
        denom = sum(math.exp(_cos(z[i], z[k]) / t) for k in range(n) if k != i)
        loss += -math.log(math.exp(_cos(z[i], z[partner]) / t) / denom)
    got = methods.SimCLR("kl", temperature=t)(torch.tensor(z1), torch.tensor(z2))
    assert float(got) == pytest.approx(loss / n, rel=1e-10)


def _sne_cost(x, z, perplexity, q_weight):
    p = kernels.perplexity(torch.tensor(x), perplexity).exp().numpy()
    n, total = len(x), 0.0
    for i in range(n):
        w = np.array([q_weight(z[i], z[j]) if j != i else 0.0 for j in range(n)])
        q = w / w.sum()
        total += sum(p[i, j] * math.log(p[i, j] / q[j]) for j in range(n) if p[i, j] > 0)
    return total / n


def test_sne_kl_equals_sne_cost(rng):
    x, z = rng.normal(size=(20, 6)), rng.normal(size=(20, 2))
    want = _sne_cost(x, z, 5.0, lambda a, b: math.exp(-np.sum((a - b) ** 2)))
    got = methods.SNE("kl", perplexity=5.0)(torch.tensor(x), torch.tensor(z))
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_tsne_kl_equals_conditional_cost(rng):
    x, z = rng.normal(size=(20, 6)), rng.normal(size=(20, 2))
    want = _sne_cost(x, z, 5.0, lambda a, b: 1.0 / (1.0 + np.sum((a - b) ** 2)))
    got = methods.TSNE("kl", perplexity=5.0)(torch.tensor(x), torch.tensor(z))
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_cross_entropy_kl_equals_torch(rng):
    logits, y = torch.tensor(rng.normal(size=(8, 5))), torch.tensor(rng.integers(0, 5, size=8))
    torch.testing.assert_close(methods.CrossEntropy("kl")(logits, y), F.cross_entropy(logits, y))
    # debias = label smoothing, up to the entropy of the smoothed target
    eps = 0.1
    target = torch.full((8, 5), eps / 5, dtype=torch.float64)
    target[torch.arange(8), y] += 1 - eps
    entropy = -(target * target.log()).sum(1).mean()
    torch.testing.assert_close(
        methods.CrossEntropy("kl", debias=eps)(logits, y),
        F.cross_entropy(logits, y, label_smoothing=eps) - entropy,
    )
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        methods.CrossEntropy()(logits, y + 5)


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("debias_side", ["p", "q", "both"])
def test_cluster_loss_matches_loop(rng, teacher, debias_side):
    n, k, alpha = 8, 3, 0.2
    logits = rng.normal(size=(n, k))
    t_logits = rng.normal(size=(n, k)) if teacher else logits
    pair = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    a = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    b = np.exp(t_logits) / np.exp(t_logits).sum(1, keepdims=True)
    total = 0.0
    for i in range(n):
        q = np.array([sum(a[i, c] * b[j, c] / b[:, c].sum() for c in range(k)) for j in range(n)])
        p = np.array([1.0 if j != i and pair[j] == pair[i] else 0.0 for j in range(n)])
        p /= p.sum()
        # q keeps its self entry (exclude_self=False): uniform over all n, for p too, so that
        # p > 0 wherever q > 0
        uniform_q = np.full(n, 1 / n)
        if debias_side in ("p", "both"):
            p = (1 - alpha) * p + alpha * uniform_q
        if debias_side in ("q", "both"):
            q = (1 - alpha) * q + alpha * uniform_q
        total += 0.5 * np.sum(np.abs(p - q))
    loss = methods.ClusterLoss("tv", debias=alpha, debias_side=debias_side)
    got = loss(
        torch.tensor(logits), torch.tensor(pair), torch.tensor(t_logits) if teacher else None
    )
    assert float(got) == pytest.approx(total / n, rel=1e-10)


def test_pmi_equals_temi_formula(rng):
    n, k, beta = 6, 4, 0.6
    sa, sb, ta, tb = (rng.normal(size=(n, k)) for _ in range(4))

    def softmax(x):
        return np.exp(x) / np.exp(x).sum(1, keepdims=True)

    prior = rng.dirichlet(np.ones(k))
    loss = methods.PMI(k, beta=beta, momentum=0.9).double()
    loss.prior.copy_(torch.tensor(prior))
    got = loss(*(torch.tensor(v) for v in (sa, sb, ta, tb)))
    s1, s2, t1, t2 = softmax(sa), softmax(sb), softmax(ta), softmax(tb)
    total = 0.0
    for i in range(n):
        w = sum(t1[i, c] * t2[i, c] for c in range(k))
        pmi_12 = math.log(sum((s1[i, c] * t2[i, c]) ** beta / prior[c] for c in range(k)))
        pmi_21 = math.log(sum((s2[i, c] * t1[i, c]) ** beta / prior[c] for c in range(k)))
        total += -0.5 * w * (pmi_12 + pmi_21)
    assert float(got) == pytest.approx(total / n, rel=1e-10)
    # the prior moved towards the teacher's mean assignment, after the loss was taken
    want_prior = 0.9 * prior + 0.1 * np.concatenate([t1, t2]).mean(0)
    np.testing.assert_allclose(loss.prior.numpy(), want_prior, rtol=1e-12)
    with pytest.raises(TypeError):  # TEMI's objective is KL's; other divergences: ClusterLoss
        methods.PMI(k, divergence="tv")


PRESETS = {
    "SupCon-cosine": lambda d: (methods.SupCon(d, "cosine", temperature=0.07), "labels"),
    "SupCon-euclidean": lambda d: (methods.SupCon(d, "euclidean"), "labels"),
    "SimCLR": lambda d: (methods.SimCLR(d, temperature=0.1), "views"),
    "SNE": lambda d: (methods.SNE(d, perplexity=4.0), "sne"),
    "TSNE": lambda d: (methods.TSNE(d, perplexity=4.0), "sne"),
    "CrossEntropy": lambda d: (methods.CrossEntropy(d), "classes"),
    "ClusterLoss": lambda d: (methods.ClusterLoss(d, debias=0.1, debias_side="both"), "cluster"),
}


def _call(loss, kind, z, y):
    if kind == "labels":
        return loss(z, y)
    if kind == "views":
        return loss(z[:8], z[8:])
    if kind == "sne":
        return loss(z.detach() * 3 + 1, z)
    if kind == "classes":
        return loss(z[:, :4], y)
    return loss(z[:, :4], torch.arange(16) % 8)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_preset_every_divergence_has_finite_gradients(preset, name, dtype):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 6, generator=gen, dtype=dtype).requires_grad_()
    y = torch.arange(16) % 4
    loss, kind = PRESETS[preset](name)
    value = _call(loss, kind, z, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    assert divergences.get(name).name == loss.divergence.name


@pytest.mark.parametrize("preset", ["SupCon-cosine", "SupCon-euclidean", "SimCLR", "ClusterLoss"])
@pytest.mark.parametrize("name", ["kl", "tv", "jsd", "hellinger"])
def test_bf16_autocast_gradients_finite(preset, name):
    torch.manual_seed(0)
    net = torch.nn.Linear(10, 6)
    x = torch.randn(16, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = net(x)
        assert z.dtype == torch.bfloat16
        loss, kind = PRESETS[preset](name)
        value = _call(loss, kind, z.float(), torch.arange(16) % 4)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("preset", ["SupCon-cosine", "SimCLR", "SNE", "ClusterLoss"])
def test_chunked_presets_equal_dense(preset):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    results = []
    for chunk in (None, 5):
        zz = z.clone().requires_grad_()
        loss, kind = PRESETS[preset]("jsd")
        loss.chunk_size = chunk
        value = _call(loss, kind, zz, torch.arange(16) % 4)
        value.backward()
        results.append((value.detach(), zz.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_supcon_all_singletons_single_view_is_an_error_two_views_are_fine():
    z, y = torch.randn(6, 4), torch.arange(6)
    with pytest.raises(ValueError, match="no mass"):
        methods.SupCon("jsd")(z, y)
    assert torch.isfinite(methods.SupCon("jsd")(torch.randn(6, 2, 4), y))


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: methods.SupCon()(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0])),
            "integer",
        ),
        (
            lambda: methods.SupCon()(torch.randn(4, 3), torch.tensor([0, 1, 0])),
            "3 entries but the batch has 4",
        ),
        (lambda: methods.SupCon()(torch.full((4, 3), math.nan), torch.tensor([0, 1, 0, 1])), "NaN"),
        (lambda: methods.SupCon(metric="manhattan"), "metric"),
        (lambda: methods.SupCon("nonsense"), "unknown divergence"),
        (lambda: methods.SimCLR()(torch.randn(4, 3), torch.randn(5, 3)), "must match"),
        (lambda: methods.ClusterLoss(debias_side="x"), "debias_side"),
        # at debias 1 the debiased side is uniform: the loss is constant or trains to nothing
        (lambda: methods.SupCon(debias=1.0), r"debias must be a number in \[0, 1\)"),
        (lambda: methods.SupCon(debias=-0.1), r"debias must be a number in \[0, 1\)"),
        (lambda: methods.SupCon(debias="0.1"), r"debias must be a number in \[0, 1\)"),
        (lambda: methods.ClusterLoss(debias=1.0), r"debias must be a number in \[0, 1\)"),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_supcon_names_a_features_argument_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="z must be a torch.Tensor, got ndarray"):
        methods.SupCon()(np.zeros((4, 3), dtype=np.float32), torch.tensor([0, 1, 0, 1]))


# --------------------------------------------------------------------------------------------
# ClusterLoss: the merged-columns path equals the dense (n, n) path
# --------------------------------------------------------------------------------------------


def _cluster_batch(seed: int, b: int = 10, k: int = 5, duplicates: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * b, k, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2 * b, k, generator=g, dtype=torch.float64)
    pair = torch.arange(b).repeat(2)
    sample = torch.randint(0, 2 * b if duplicates else 10**6, (2 * b,), generator=g)
    return logits, teacher, pair, sample


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"exclude_self": True},
        {"debias": 0.2, "debias_side": "q"},
        {"debias": 0.3, "debias_side": "q", "exclude_self": True},
        {"neighbor_mix": 0.4, "n_neighbors": 3},
        {"neighbor_mix": 0.5, "n_neighbors": 4, "debias": 0.2, "debias_side": "q"},
    ],
)
@pytest.mark.parametrize("extras", ["pairs", "teacher+samples"])
def test_cluster_merged_columns_equal_dense(divergence, options, extras):
    logits, teacher, pair, sample = _cluster_batch(3)
    kwargs = {}
    if extras != "pairs":
        kwargs = {"teacher_logits": teacher, "sample_index": sample}
    if options.get("neighbor_mix"):
        g = torch.Generator().manual_seed(7)
        kwargs["features"] = torch.randn(len(pair), 3, generator=g, dtype=torch.float64)
    values, grads = [], []
    for compress in (True, False):
        z = logits.clone().requires_grad_(True)
        loss = methods.ClusterLoss(divergence, compress=compress, **options)
        value = loss(z, pair, **kwargs)
        value.backward()
        values.append(float(value.detach()))
        grads.append(z.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-11)


def test_cluster_merged_columns_confident_and_lonely():
    """Confident heads (|logits| ~ 40) and points alone in their cluster: no underflow, no nan."""
    logits, _, pair, sample = _cluster_batch(5, b=6, k=12)
    logits = logits * 15
    for exclude_self in (False, True):
        values = []
        for compress in (True, False):
            z = logits.clone().requires_grad_(True)
            value = methods.ClusterLoss("tv", exclude_self=exclude_self, compress=compress)(
                z, pair, sample_index=sample
            )
            value.backward()
            assert torch.isfinite(z.grad).all()
            values.append(float(value.detach()))
        assert values[0] == pytest.approx(values[1], abs=1e-9)


def test_positive_columns_union_of_keys_without_self():
    pair = torch.tensor([0, 1, 2, 0, 1, 2])
    sample = torch.tensor([7, 8, 9, 8, 5, 7])  # row 3 holds sample 8, as row 1 does
    columns, mask = kernels.positive_columns(pair, sample)
    listed = [sorted(set(columns[i][mask[i]].tolist())) for i in range(6)]
    assert [len(columns[i][mask[i]]) for i in range(6)] == [len(x) for x in listed]  # no repeats
    want = [
        [j for j in range(6) if j != i and (pair[j] == pair[i] or sample[j] == sample[i])]
        for i in range(6)
    ]
    assert listed == want


def test_same_sample_columns_are_positives():
    """A sample drawn twice into a batch puts p mass on its own copy, never counts it negative."""
    logits, _, pair, _ = _cluster_batch(1, b=3)
    sample = torch.tensor([10, 11, 12, 13, 10, 14])  # sample 10: anchor 0 and partner of pair 1
    loss = methods.ClusterLoss("kl", compress=False)
    # p of row 0: its pair-mate (row 3) and its own copy (row 4), half each
    columns, mask = kernels.positive_columns(torch.arange(3).repeat(2), sample)
    row0 = sorted(columns[0][mask[0]].tolist())
    assert row0 == [3, 4]
    with_samples = loss(logits, pair, sample_index=sample)
    without = loss(logits, pair)
    log_q = kernels.clusters(torch.log_softmax(logits, -1))
    want0 = -0.5 * (log_q[0, 3] + log_q[0, 4]) - math.log(2)  # KL(uniform{3,4} || q)
    rows = [want0]
    for i in range(1, 6):
        cols = columns[i][mask[i]]
        rows.append(
            -log_q[i, cols].mean() - math.log(len(cols)) if len(cols) else torch.tensor(0.0)
        )
    assert float(with_samples) == pytest.approx(float(torch.stack(rows).mean()), rel=1e-10)
    assert float(with_samples) != pytest.approx(float(without))


def test_divergences_not_of_the_f_family_take_the_dense_path():
    """A user divergence that depends on how q spreads over p's zeros is not merged."""

    def spread(log_p, log_q):  # sum_j q_j^2: changes when columns are merged
        return (2 * log_q).exp().sum(-1) + 0 * log_p.clamp_min(-1).sum(-1)

    logits, _, pair, _ = _cluster_batch(2)
    got = methods.ClusterLoss(spread)(logits, pair)
    dense = methods.ClusterLoss(spread, compress=False)(logits, pair)
    assert float(got) == pytest.approx(float(dense), rel=1e-12)
    assert divergences.get(spread).f_family is False
    assert all(divergences.get(d).f_family for d in DIVERGENCES + ["reverse_kl", "jeffreys"])
    generated = divergences.f_divergence(lambda t: (t - 1) ** 2, name="pearson")
    assert divergences.get(generated).f_family


@pytest.mark.parametrize("compress", [True, False])
def test_cluster_heads_together_equal_one_by_one(compress):
    """(h, n, k) logits give the (h,) losses of the heads, each as if computed alone."""
    logits, teacher, pair, sample = _cluster_batch(4)
    heads = torch.stack([logits, -logits, 0.5 * logits]).requires_grad_(True)
    teachers = torch.stack([teacher, teacher.flip(0), teacher * 2])
    loss = methods.ClusterLoss("jsd", exclude_self=True, compress=compress)
    together = loss(heads, pair, teachers, sample_index=sample)
    assert together.shape == (3,)
    together.sum().backward()
    alone = heads.detach().clone().requires_grad_(True)
    one_by_one = torch.stack(
        [loss(alone[h], pair, teachers[h], sample_index=sample) for h in range(3)]
    )
    one_by_one.sum().backward()
    torch.testing.assert_close(together.detach(), one_by_one.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(heads.grad, alone.grad, rtol=1e-10, atol=1e-13)


def _partition_loss(divergence: str, sizes: list[int]) -> float:
    """Cluster loss of confident heads on pairs that never straddle a cluster."""
    k = 4
    clusters = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    # pairs inside each cluster: (0, 1), (2, 3), ... within the sorted labels
    pair = torch.arange(len(clusters)) // 2
    logits = 40.0 * F.one_hot(clusters, k).double()
    return float(methods.ClusterLoss(divergence)(logits, pair))


def test_neighbor_mix_p_against_a_dense_construction():
    """p = (1 - w) uniform over the pair-mates + w uniform over the batch's k nearest points
    (Euclidean, never the anchor); a mate that is also a neighbour gets both shares."""
    g = torch.Generator().manual_seed(3)
    n, k, w = 12, 3, 0.3
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    pair = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 4])  # row 5 has no mate, 4 has two
    loss = methods.ClusterLoss("kl", neighbor_mix=w, n_neighbors=k)
    columns, mask, log_p = loss._positives(pair, None, x)
    p = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        p[i, columns[i][mask[i]]] = log_p[i][mask[i]].exp()
    d2 = torch.cdist(x, x) ** 2
    d2.fill_diagonal_(math.inf)
    want = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        mates = [j for j in range(n) if j != i and pair[j] == pair[i]]
        for j in mates:
            want[i, j] += (1 - w) / len(mates)
        for j in d2[i].argsort()[:k].tolist():
            want[i, j] += w / k
        want[i] /= want[i].sum()  # row 5: its neighbours only
    torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-15)
    assert want[5].max() == pytest.approx(1 / k)
    assert (columns[mask].view(-1) >= 0).all() and not any(
        i in columns[i][mask[i]].tolist() for i in range(n)
    )


def test_neighbor_mix_p_of_one_process_s_rows_equals_those_rows_of_the_whole():
    """Under torchrun a process reads only its rows of p: it searches only their neighbours
    (among the whole batch) and gets those rows exactly; a row outside them without a mate
    has no mass."""
    g = torch.Generator().manual_seed(4)
    n, k, w = 12, 3, 0.4
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    pair = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 4])  # row 5 has no mate

    def dense(columns, mask, log_p):
        p = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            p[i, columns[i][mask[i]]] = log_p[i][mask[i]].exp()
        return p

    loss = methods.ClusterLoss("tv", neighbor_mix=w, n_neighbors=k)
    whole = dense(*loss._positives(pair, None, x))
    # row 5 has no mate: p on its neighbours only when searched, no mass at all when not
    for rows in (slice(3, 8), slice(6, 12)):
        columns, mask, log_p = loss._positives(pair, None, x, rows)
        torch.testing.assert_close(dense(columns, mask, log_p)[rows], whole[rows], rtol=0, atol=0)
    assert (log_p[5] == -math.inf).all()
    assert torch.equal(
        loss._positives(pair, None, x, slice(0, n))[2], loss._positives(pair, None, x)[2]
    )


def test_neighbor_mix_pulls_every_divergence_toward_the_data_s_clusters():
    """4 well-separated groups of 4 points, pairs inside groups, confident heads. With pairs
    alone TV cannot tell the groups' partition from one that merges two groups and splits a
    third (pairs never straddle either); with the batch's k-NN mixed into p every divergence
    prefers the groups, and so does TV."""
    groups = torch.arange(16) // 4
    x = 10.0 * F.one_hot(groups, 4).double() + 0.01 * torch.arange(16.0)[:, None].double()
    pair = torch.arange(16) // 2
    true = groups
    wrong = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])  # sizes 8, 4, 2, 2

    def value(divergence, clusters, mix):
        logits = 40.0 * F.one_hot(clusters, 4).double()
        loss = methods.ClusterLoss(divergence, neighbor_mix=mix, n_neighbors=3)
        return float(loss(logits, pair, features=x if mix else None))

    assert value("tv", true, 0.0) == pytest.approx(value("tv", wrong, 0.0), abs=1e-12)
    for divergence in ("kl", "tv", "jsd", "hellinger"):
        assert value(divergence, wrong, 0.5) > value(divergence, true, 0.5) + 1e-2, divergence


def test_neighbor_mix_checks():
    with pytest.raises(ValueError, match="neighbor_mix must be a number in"):
        methods.ClusterLoss("tv", neighbor_mix=1.0)
    with pytest.raises(ValueError, match="set neighbor_mix > 0"):
        methods.ClusterLoss("tv", propagate_steps=2)
    logits, _, pair, _ = _cluster_batch(1)
    with pytest.raises(ValueError, match="needs the batch's features"):
        methods.ClusterLoss("tv", neighbor_mix=0.5)(logits, pair)
    with pytest.raises(ValueError, match="features must have 20 rows"):
        methods.ClusterLoss("tv", neighbor_mix=0.5)(logits, pair, features=torch.zeros(3, 2))


def test_balance_pull_of_each_divergence_on_constructed_partitions():
    """16 points in pairs, confident heads, q(mate|i) = 1/|c|. Collapsing into one cluster is
    worse than using all four for every divergence; among partitions that use all four, KL,
    JSD and Hellinger prefer the balanced one (mean of log|c|, of a concave function of 1/|c|),
    while TV is exactly indifferent: its loss is 1 - q(mate|i), whose mean is (n - K) / n
    whatever the sizes. This is why TV needs the kernel's, not the divergence's, pressure to
    balance (README, Clustering frozen embeddings)."""
    balanced, skewed, collapsed = [4, 4, 4, 4], [10, 2, 2, 2], [16]
    for divergence in ("kl", "jsd", "hellinger", "tv"):
        b, s, c = (_partition_loss(divergence, sizes) for sizes in (balanced, skewed, collapsed))
        assert c > b and c > s, divergence
        if divergence == "tv":
            assert b == pytest.approx(s, abs=1e-12) and b == pytest.approx(12 / 16, abs=1e-12)
        else:
            assert s > b + 1e-3, divergence


@pytest.mark.parametrize("divergence", ["kl", "tv", "jsd"])
def test_cluster_merged_columns_float32_with_huge_logit_gaps(divergence):
    """float32, exclude_self: other points' cluster mass 120 nats below a point's own (their
    linear-scale sums would underflow) still gives the dense path's value."""
    logits = torch.tensor([[0.0, -120], [-120, 0], [0, -120], [0, -120]])
    pair = torch.tensor([0, 0, 1, 1])
    values = [
        float(methods.ClusterLoss(divergence, exclude_self=True, compress=c)(logits, pair))
        for c in (True, False)
    ]
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    g = torch.Generator().manual_seed(0)
    confident = torch.randn(16, 5, generator=g) * 300
    pairs = torch.arange(8).repeat(2)
    loss = [
        float(
            methods.ClusterLoss(
                divergence, exclude_self=True, debias=0.3, debias_side="q", compress=c
            )(confident, pairs)
        )
        for c in (True, False)
    ]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


@pytest.mark.parametrize("name", ["tv", "kl", "jsd", "tv-unflagged"])
def test_cluster_loss_without_value_checks_matches_and_syncs_only_for_its_widths(name):
    """The merged-columns path with value checks off: the same head losses and gradients
    (rows without a pair-mate masked out), and only the three syncs that size the positive
    table (data-dependent shapes): the key's groups (unique_consecutive) and two widths."""
    from beyond_icon import value_checks
    from beyond_icon.profiling import HostSyncCounter

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 11, 4, generator=gen, dtype=torch.float64)
    pairs = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 5, 6])  # ids 4, 5, 6 have no mate
    from beyond_icon.divergences import Divergence, tv

    # an f-divergence not known to be finite where p = 0 takes the p := q stand-in path
    divergence = Divergence("tv-unflagged", tv, f_family=True) if name == "tv-unflagged" else name
    loss = methods.ClusterLoss(divergence)
    checked_logits = logits.clone().requires_grad_()
    checked = loss(checked_logits, pairs)
    checked.sum().backward()
    fast_logits = logits.clone().requires_grad_()
    with value_checks(False), HostSyncCounter() as syncs:
        fast = loss(fast_logits, pairs)
        fast.sum().backward()
    torch.testing.assert_close(fast, checked)
    torch.testing.assert_close(fast_logits.grad, checked_logits.grad)
    assert syncs.count == 3 and all("kernels.py" in c for c in syncs.calls), syncs.calls


@pytest.mark.parametrize("exclude_self", [False, True])
def test_cluster_loss_debiased_p_makes_reverse_kl_finite(rng, exclude_self):
    """p's uniform part covers q's support (the self pair unless excluded): reverse KL, infinite
    where q > 0 = p, is finite once p is debiased, as the task's check promises."""
    logits = torch.tensor(rng.normal(size=(6, 3)))
    pair = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = methods.ClusterLoss(
        "reverse_kl", debias=0.1, debias_side="p", exclude_self=exclude_self
    )(logits, pair)
    assert math.isfinite(float(loss))


def test_pmi_checks_the_teacher_logits():
    loss = methods.PMI(3)
    student = torch.randn(4, 3)
    with pytest.raises(ValueError, match="teacher_logits_a contains NaN"):
        loss(student, student, torch.full((4, 3), math.nan), student)
    assert not torch.isnan(loss.prior).any()  # the prior was not touched
    with pytest.raises(ValueError, match=r"teacher_logits_a must have the students' shape"):
        loss(student, student, torch.randn(5, 3), torch.randn(5, 3))
