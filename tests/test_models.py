"""Backbone and head shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beyond_icon import models


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_resnets_on_32x32(name, dim):
    net = models.build_backbone(name, (3, 32, 32))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim) and net.feature_dim == dim
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 28, 28)])
def test_small_cnn_and_auto(shape):
    net = models.build_backbone("auto", shape)
    assert isinstance(net, models.SmallCNN)
    assert net(torch.randn(3, *shape)).shape == (3, net.feature_dim)


def test_mlp_and_standardize():
    x = torch.randn(10, 5) * 3 + 7
    std = models.Standardize.fit(x)
    assert torch.allclose(std(x).mean(0), torch.zeros(5), atol=1e-5)
    net = models.build_backbone("auto", (5,))
    assert isinstance(net, models.MLP) and net(std(x)).shape == (10, 512)
    images = torch.rand(4, 3, 6, 6)
    assert models.Standardize.fit(images)(images).shape == images.shape
    # the same statistics from blocks of rows of a float16 array (a memory-mapped table)
    rows = np.random.default_rng(0).normal(3, 2, size=(101, 5)).astype(np.float16)
    by_blocks = models.Standardize.fit_rows(rows, block=17)
    whole = models.Standardize.fit(torch.as_tensor(rows, dtype=torch.float32))
    torch.testing.assert_close(by_blocks.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_blocks.std, whole.std, rtol=1e-5, atol=1e-5)


def test_heads():
    head = models.ClusterHead(16, n_clusters=7, n_heads=3, kind="mlp")
    assert head(torch.randn(5, 16)).shape == (3, 5, 7)
    assert models.ProjectionHead(16, 128)(torch.randn(4, 16)).shape == (4, 128)
    with pytest.raises(ValueError, match="head"):
        models.ClusterHead(16, 7, kind="conv")


def test_batched_heads_are_independent_linear_maps():
    heads = models.HeadLinear(6, 4, n_heads=3)
    x = torch.randn(5, 6)
    out = heads(x)
    for h in range(3):
        torch.testing.assert_close(out[h], x @ heads.weight[h] + heads.bias[h])
    torch.testing.assert_close(heads(x.expand(3, 5, 6)), out)
    out[1].sum().backward()  # head 1's loss moves head 1 only
    assert heads.weight.grad[0].abs().max() == 0 and heads.weight.grad[1].abs().max() > 0


def test_temi_head_is_cosine_to_unit_prototypes_over_temperature():
    head = models.ClusterHead(8, n_clusters=5, n_heads=2, kind="temi", hidden=16, bottleneck=4)
    logits = head(torch.randn(7, 8))
    assert logits.shape == (2, 7, 5)
    assert logits.abs().max() <= 1 / 0.1 + 1e-5  # |cosine| <= 1, divided by the temperature
    x = torch.randn(3, 8)
    before = head(x)
    with torch.no_grad():
        head.last.weight.mul_(3.0)  # the prototypes' scale does not matter
    torch.testing.assert_close(head(x), before)


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build_backbone("vit", (3, 32, 32))
    with pytest.raises(ValueError, match="needs images"):
        models.build_backbone("resnet18", (64,))


def _cell_mlp(m: int = 7, d: int = 5, seed: int = 0) -> tuple[models.CellMLP, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    landmarks = torch.randn(m, d, generator=g)
    landmarks[-1] = 100.0  # a cell no test point falls in
    torch.manual_seed(seed)
    net = models.CellMLP(d, landmarks, hidden=(6, 4))
    assert not net.offsets.weight.any() and net.offset_scale == 0.2 * m**0.5  # the plain MLP
    with torch.no_grad():
        net.offsets.weight.normal_(generator=g)
    return net, landmarks


def test_cell_mlp_cells_are_the_nearest_landmarks():
    net, landmarks = _cell_mlp()
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    reference = torch.cdist(x.double(), landmarks.double()).argmin(1)
    assert torch.equal(net.cells(x), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # looked up in float32 under autocast
        assert torch.equal(net.cells(x), reference)


def test_cell_mlp_lookup_in_blocks_and_among_candidates(monkeypatch):
    """The blocked lookup (rows beyond LOOKUP_ROWS) is the one-block lookup; the nearest among
    each row's candidates is the nearest overall whenever they hold it, and the nearest of
    the candidates otherwise; forward with given cells is forward with looked-up ones."""
    g = torch.Generator().manual_seed(3)
    landmarks = torch.randn(40, 5, generator=g)
    net = models.CellMLP(5, landmarks, hidden=(6,))
    x = torch.randn(301, 5, generator=g)
    reference = torch.cdist(x.double(), landmarks.double()).argmin(1)
    monkeypatch.setattr(models.CellMLP, "LOOKUP_ROWS", 64)
    assert torch.equal(net.cells(x), reference)
    assert net.cells(x[:0]).shape == (0,) and net(x[:0]).shape == (0, 6)
    near = net.neighbouring_cells(8)
    assert near.shape == (40, 8) and torch.equal(near[:, 0], torch.arange(40))
    order = torch.cdist(landmarks.double(), landmarks.double()).argsort(1)[:, :8]
    assert torch.equal(near.sort(1).values, order.sort(1).values)
    assert torch.equal(net.nearest_among(x, torch.arange(40).expand(301, 40)), reference)
    candidates = near[reference.roll(1)]  # another row's neighbourhood: the true cell or not
    found = net.nearest_among(x, candidates)
    distances = torch.cdist(x.double(), landmarks.double())
    best = distances.gather(1, candidates).min(1).values
    torch.testing.assert_close(distances.gather(1, found[:, None]).squeeze(1), best)
    assert (found != reference).any() and (found == reference).any()
    # training's lookup: among the cells near the given clean cell
    assert torch.equal(net.cells_near(x, reference.roll(1), near), found)
    assert torch.equal(net.cells_near(x, reference, near), reference)
    with torch.no_grad():
        net.offsets.weight.normal_(generator=g)
    torch.testing.assert_close(net(x, cells=net.cells(x)), net(x))
    other = (net.cells(x) + 1) % 40  # given cells are the ones used
    assert not torch.allclose(net(x, cells=other), net(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast
        assert torch.equal(net.nearest_among(x, near[reference]), reference)


def test_cell_mlp_is_an_mlp_on_the_inputs_and_a_scaled_one_hot_of_the_cell():
    """h1 = relu(W x + b + s e_c), s = 0.2 sqrt(m): the same as a linear layer on
    [x, s onehot(c)] whose extra columns are the offsets; values and gradients."""
    net, landmarks = _cell_mlp()
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(2))
    out = net(x)
    first = net.net[0]
    wide = torch.nn.Linear(5 + 7, 6)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([first.weight, net.offsets.weight.T], 1))
        wide.bias.copy_(first.bias)
    onehot = torch.nn.functional.one_hot(torch.cdist(x, landmarks).argmin(1), 7).float()
    reference = net.net[1:](wide(torch.cat([x, 0.2 * 7**0.5 * onehot], 1)))
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(net.offsets.weight.grad, wide.weight.grad[:, 5:].T)
    torch.testing.assert_close(first.weight.grad, wide.weight.grad[:, :5])
    unused = sorted(set(range(7)) - set(net.cells(x).tolist()))
    assert (
        unused and not net.offsets.weight.grad[unused].any()
    )  # a cell no point falls in is not moved


def test_cell_mlp_state_dict_round_trip_and_errors():
    net, _ = _cell_mlp()
    copy, _ = _cell_mlp(seed=1)
    copy.load_state_dict(net.state_dict())
    x = torch.randn(9, 5)
    torch.testing.assert_close(copy(x), net(x))
    assert "cells=7" in repr(net)
    with pytest.raises(ValueError, match="landmarks must be"):
        models.CellMLP(5, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="landmarks must be"):
        models.CellMLP(5, torch.zeros(4, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_cell_mlp_lookup_under_tracing_and_torch_func():
    """The CPU lookup's numpy argmax is left out where torch must see every op: a traced
    model looks the cells of new inputs up (not those of the example frozen in), and
    ``torch.func.vmap`` runs."""
    net, landmarks = _cell_mlp()
    g = torch.Generator().manual_seed(5)
    example, new = torch.randn(50, 5, generator=g), torch.randn(60, 5, generator=g)
    assert not torch.equal(net.cells(example[:1]).expand(60), net.cells(new))
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.testing.assert_close(traced(new), net(new))
    mapped = torch.func.vmap(lambda row: net(row[None])[0])(new)
    torch.testing.assert_close(mapped, net(new))


def _two_level_reference(x, landmarks, centres, lists) -> torch.Tensor:
    """float64: the nearest centre of each row, then the nearest landmark on its list."""
    group = torch.cdist(x.double(), centres.double()).argmin(1)
    allowed = torch.zeros(len(centres), len(landmarks), dtype=torch.bool)
    allowed.scatter_(1, lists, True)
    distances = torch.cdist(x.double(), landmarks.double())
    return distances.masked_fill(~allowed[group], float("inf")).argmin(1)


def test_coarse_index_lists_hold_their_groups_and_the_centres_nearest():
    g = torch.Generator().manual_seed(7)
    landmarks = torch.randn(300, 6, generator=g)
    centres, lists = models.coarse_index(landmarks, 8, 40)
    again = models.coarse_index(landmarks, 8, 40)  # a fixed function of the landmarks
    assert torch.equal(again[0], centres) and torch.equal(again[1], lists)
    assert centres.shape == (8, 6) and lists.shape[0] == 8 and lists.shape[1] >= 40
    assert torch.equal(lists, lists.sort(1).values)
    assert all(len(set(row.tolist())) == lists.shape[1] for row in lists)
    own = torch.cdist(landmarks, centres).argmin(1)
    for group in range(8):
        members = set(torch.nonzero(own == group).flatten().tolist())
        listed = set(lists[group].tolist())
        assert members <= listed  # a group's own landmarks, then its centre's nearest others
        others = torch.cdist(centres[group : group + 1], landmarks)[0]
        outside = others[[i for i in range(300) if i not in listed]]
        inside = others[[i for i in listed if i not in members]]
        assert len(inside) == 0 or inside.max() <= outside.min()
    for groups, candidates in [(1, 40), (300, 40), (8, 0), (8, 301)]:
        with pytest.raises(ValueError, match="coarse index needs 2 <= groups < m"):
            models.coarse_index(landmarks, groups, candidates)


def test_cell_mlp_two_level_lookup(monkeypatch):
    """From TWO_LEVEL_FROM landmarks the cell is the nearest landmark on the list of the
    nearest centre: the float64 reference in the CPU path, the masked torch path (GPU, traced)
    and among candidates; every landmark is its own cell; the lookup's tables follow loaded
    buffers; an old pickle without the index takes the exact lookup."""
    import pickle

    g = torch.Generator().manual_seed(11)
    landmarks = torch.randn(300, 6, generator=g)
    net = models.CellMLP(6, landmarks, hidden=(5,), coarse=8, candidates=40)
    x = torch.randn(2000, 6, generator=g)
    reference = _two_level_reference(x, landmarks, net.coarse, net.coarse_lists)
    exact = torch.cdist(x.double(), landmarks.double()).argmin(1)
    assert torch.equal(net.cells(x), reference) and torch.equal(net.cells(x[:0]), exact[:0])
    agree = (reference == exact).double().mean()
    assert 0.7 < agree < 1  # mostly the nearest landmark, not always
    assert torch.equal(net.cells(landmarks), torch.arange(300))
    with monkeypatch.context() as patched:  # the torch path of GPUs and traced models
        patched.setattr(models, "_opaque_to_numpy", lambda x: True)
        assert torch.equal(net.cells(x), reference)
        patched.setattr(models.CellMLP, "LOOKUP_ROWS_CUDA", 64)
        assert torch.equal(net.cells(x), reference)
    near = net.neighbouring_cells(16)
    assert torch.equal(net.nearest_among(x, near[reference]), reference)
    assert torch.equal(net.nearest_among(x, torch.arange(300).expand(2000, 300)), reference)
    # candidates off the list of the row's centre are passed over, and with none on it the
    # row takes the full lookup
    allowed = torch.zeros(8, 300, dtype=torch.bool).scatter_(1, net.coarse_lists, True)
    group = torch.cdist(x, net.coarse).argmin(1)
    off = (~allowed[group]).double().argmax(1, keepdim=True)  # one landmark off the list
    assert torch.equal(net.nearest_among(x, off), reference)
    both = torch.cat([off, reference[:, None]], 1)
    assert torch.equal(net.nearest_among(x, both), reference)
    other = models.CellMLP(6, landmarks * 2 + 1, hidden=(5,), coarse=8, candidates=40)
    assert not torch.equal(other.cells(x), reference)
    net.load_state_dict(other.state_dict())  # the tables are rebuilt from the new buffers
    assert torch.equal(net.cells(x), other.cells(x))
    assert not {"centre_scores", "list_scores", "blocked"} & set(net.state_dict())
    # lists as wide as another model's largest group load too
    wider = models.CellMLP(6, torch.randn(300, 6, generator=g) ** 3, hidden=(5,), coarse=8)
    assert wider.coarse_lists.shape != net.coarse_lists.shape
    net.load_state_dict(wider.state_dict())
    assert torch.equal(net.cells(x), wider.cells(x))
    loaded = pickle.loads(pickle.dumps(net))
    assert torch.equal(loaded.cells(x), wider.cells(x))
    with torch.inference_mode():  # built, copied and moved in inference mode
        made = models.CellMLP(6, landmarks, hidden=(5,), coarse=8, candidates=40).to("cpu")
    assert torch.equal(made.cells(x), reference)
    del net._buffers["coarse"], net._buffers["coarse_lists"]  # pickled before the index
    assert torch.equal(net.cells(x), torch.cdist(x, wider.landmarks).argmin(1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_two_level_lookup_under_tracing_and_torch_func():
    g = torch.Generator().manual_seed(12)
    landmarks = torch.randn(300, 6, generator=g)
    net = models.CellMLP(6, landmarks, hidden=(5,), coarse=8, candidates=40)
    with torch.no_grad():
        net.offsets.weight.normal_(generator=g)
    example, new = torch.randn(50, 6, generator=g), torch.randn(400, 6, generator=g)
    reference = _two_level_reference(new, landmarks, net.coarse, net.coarse_lists)
    assert torch.equal(net.cells(new), reference)
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.testing.assert_close(traced(new), net(new))
    mapped = torch.func.vmap(lambda row: net(row[None])[0])(new)
    torch.testing.assert_close(mapped, net(new))


def test_cell_mlp_takes_the_two_level_lookup_from_1024_landmarks():
    g = torch.Generator().manual_seed(0)
    big = models.CellMLP(3, torch.randn(1024, 3, generator=g), hidden=(4,))
    assert big.coarse.shape == (64, 3) and big.coarse_lists.shape[1] >= 256
    assert "coarse" in big.state_dict()
    small = models.CellMLP(3, torch.randn(1023, 3, generator=g), hidden=(4,))
    assert not small._two_level() and "coarse" not in small.state_dict()


def test_cell_directions_span_each_cells_principal_plane_in_float64():
    rng = np.random.default_rng(0)
    landmarks = torch.as_tensor(rng.normal(size=(4, 6)) * 5, dtype=torch.float32)
    cells = torch.as_tensor(np.r_[np.zeros(30), np.ones(12), [2], np.full(3, 3)]).long()
    # cell 0 spread along two directions, the others at random; cell 2 holds one point
    spread = rng.normal(size=(46, 6)) * 0.05
    spread[:30, :2] += rng.normal(size=(30, 2)) * [3.0, 1.0]
    inputs = landmarks[cells] + torch.as_tensor(spread, dtype=torch.float32)
    bases = models.cell_directions(inputs, cells, landmarks, 2)
    assert bases.shape == (4, 2, 6) and bases.dtype == torch.float32
    for cell in (0, 1, 3):
        offsets = (inputs[cells == cell] - landmarks[cell]).double().numpy()
        reference = np.linalg.svd(offsets, full_matrices=False)[2][:2]
        found = bases[cell].double().numpy()
        np.testing.assert_allclose(found @ found.T, np.eye(2), atol=1e-5)  # orthonormal rows
        # the same plane (signs and order within it aside: compare the projectors)
        np.testing.assert_allclose(found.T @ found, reference.T @ reference, atol=1e-4)
    assert abs(float(bases[0, 0, 0])) > 0.99  # cell 0: its widest direction first
    assert not bases[2].any()  # one point: no direction


def test_cell_mlp_local_maps_start_at_zero_and_are_each_cells_linear_map():
    """out = MLP path + B A_c U_c (x - mu_c): zero at the start; after a change of A, the
    added part is exactly that linear map of the row's offset, with its gradient."""
    rng = torch.Generator().manual_seed(0)
    landmarks = torch.randn(7, 5, generator=rng) * 4
    inputs = landmarks[torch.arange(70) % 7] + torch.randn(70, 5, generator=rng)
    net = models.CellMLP(5, landmarks, hidden=(6,), local_dims=3, inputs=inputs)
    plain = models.CellMLP(5, landmarks, hidden=(6,))
    plain.load_state_dict(net.state_dict(), strict=False)
    x = inputs[:20] + 0.1 * torch.randn(20, 5, generator=rng)
    torch.testing.assert_close(net(x), plain(x))  # A_c = 0: the CellMLP without the maps
    with torch.no_grad():
        net.local.weight.normal_(generator=rng)
    cells = net.cells(x)
    a = net.local.weight[cells].view(20, 2, 3)
    u = torch.einsum("nqd,nd->nq", net.local_basis[cells], x - landmarks[cells])
    added = torch.einsum("nrq,nq->nr", a, u) @ net.local_out.weight.T
    torch.testing.assert_close(net(x), plain(x) + added)
    net(x).sum().backward()
    unused = sorted(set(range(7)) - set(cells.tolist()))
    assert not unused or not net.local.weight.grad[unused].any()
    assert net.local.weight.grad[cells].abs().sum() > 0
    assert "local_dims=3" in repr(net) and "local_dims" not in repr(plain)
    copy = models.CellMLP(5, landmarks, hidden=(6,), local_dims=3, inputs=inputs[:14])
    copy.load_state_dict(net.state_dict())  # the bases are saved with the weights
    torch.testing.assert_close(copy(x), net(x))


def test_cell_mlp_local_maps_refuse_bad_settings():
    landmarks = torch.randn(4, 3)
    with pytest.raises(ValueError, match="needs the training inputs"):
        models.CellMLP(3, landmarks, local_dims=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="local_dims must be a non-negative integer"):
            models.CellMLP(3, landmarks, local_dims=bad, inputs=landmarks)
    with pytest.raises(ValueError, match="local_rank must be a positive integer"):
        models.CellMLP(3, landmarks, local_dims=1, inputs=landmarks, local_rank=0)
    wide = models.CellMLP(3, landmarks, local_dims=9, inputs=landmarks.repeat(3, 1))
    assert wide.local_dims == 3  # at most the input's dimension


def test_cell_mlp_local_maps_in_blocks_of_rows_are_the_maps_of_all_rows(monkeypatch):
    rng = torch.Generator().manual_seed(3)
    landmarks = torch.randn(5, 4, generator=rng) * 3
    inputs = landmarks[torch.arange(50) % 5] + torch.randn(50, 4, generator=rng)
    net = models.CellMLP(4, landmarks, hidden=(6,), local_dims=2, inputs=inputs)
    with torch.no_grad():
        net.local.weight.normal_(generator=rng)
    whole = net(inputs)
    monkeypatch.setattr(models.CellMLP, "LOCAL_ROWS", 7)
    torch.testing.assert_close(net(inputs), whole)


@pytest.mark.parametrize("local_dims, m", [(3, 7), (0, 7), (2, 1100)])
def test_cell_mlp_embed_folds_the_maps_through_the_head(local_dims, m, monkeypatch):
    """embed(x, head) is head(forward(x)) up to float32 rounding, with the maps folded into
    one (out, in_dim) matrix per cell; also with the two-level lookup (m >= 1,024)."""
    rng = torch.Generator().manual_seed(4)
    landmarks = torch.randn(m, 5, generator=rng) * 4
    inputs = landmarks[torch.arange(6 * m) % m] + torch.randn(6 * m, 5, generator=rng)
    net = models.CellMLP(
        5, landmarks, hidden=(6, 4), local_dims=local_dims, inputs=inputs if local_dims else None
    )
    head = torch.nn.Linear(net.feature_dim, 2)
    with torch.no_grad():
        net.offsets.weight.normal_(generator=rng)
        if local_dims:
            net.local.weight.normal_(generator=rng)
    x = inputs[:40] + 0.3 * torch.randn(40, 5, generator=rng)
    expected = head(net(x))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(net.embed(x, head), expected, rtol=1e-5, atol=1e-5)
    assert net.embed(x[:1], head).shape == (1, 2)
    monkeypatch.setattr(models.CellMLP, "LOCAL_ROWS", 7)  # the maps in blocks of rows
    torch.testing.assert_close(net.embed(x, head), expected, rtol=1e-5, atol=1e-5)


def test_cell_mlp_pickled_before_the_local_maps_still_runs():
    """A CellMLP pickled before local_dims existed has none of its attributes."""
    import pickle

    net, _ = _cell_mlp()
    x = torch.randn(9, 5)
    before = net(x)
    del net.local_dims, net.local_rank
    old = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(old(x), before)
    head = torch.nn.Linear(old.feature_dim, 2)
    torch.testing.assert_close(old.embed(x, head), head(before))
    assert "cells=7" in repr(old) and "local_dims" not in repr(old)
