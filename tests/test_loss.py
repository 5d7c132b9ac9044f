"""icon_loss: the average, empty rows, the chunked path, validation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_distributions, to_log

import beyond_icon as bi
from beyond_icon import divergences, kernels

ALL = ["kl", "reverse_kl", "tv", "hellinger", "jsd", "chi2", "jeffreys", "alpha:0.5"]


def test_mean_of_rows(rng):
    p, q = random_distributions(rng, 6, 5), random_distributions(rng, 6, 5)
    for name in ALL:
        want = divergences.get(name)(to_log(p), to_log(q)).mean()
        torch.testing.assert_close(bi.icon_loss(to_log(p), to_log(q), name), want)
    want_sum = divergences.tv(to_log(p), to_log(q)).sum()
    torch.testing.assert_close(bi.icon_loss(to_log(p), to_log(q), "tv", reduction="sum"), want_sum)


def test_empty_rows_are_left_out_and_counted():
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # classes 1 and 3 appear once
    z = torch.randn(7, 3, dtype=torch.float64)
    log_p, log_q = kernels.labels(y, dtype=torch.float64), kernels.gaussian(z)
    loss, stats = bi.icon_loss(log_p, log_q, "jsd", return_stats=True)
    keep = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(loss, divergences.jsd(log_p[keep], log_q[keep]).mean())
    assert stats == bi.LossStats(n_rows=5, n_empty=2)


def test_all_rows_empty_is_an_error():
    y = torch.arange(5)
    with pytest.raises(ValueError, match="every one of the 5 rows of p has no mass"):
        bi.icon_loss(kernels.labels(y), kernels.gaussian(torch.randn(5, 2)), "kl")


def test_empty_rows_have_no_gradient_effect():
    y = torch.tensor([0, 0, 1, 2, 2])
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bi.icon_loss(kernels.labels(y, dtype=torch.float64), kernels.gaussian(z), "tv").backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ["kl", "tv", "jsd", "hellinger", "chi2", "alpha:0.5"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_dense_values_and_gradients(name, chunk_size):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(23, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (23,), generator=gen)
    y[0] = 99  # one empty row

    def run(chunk):
        zz = z.clone().requires_grad_()
        loss = bi.icon_loss(
            lambda rows: kernels.labels(y, rows=rows, dtype=zz.dtype),
            lambda rows: kernels.gaussian(zz, 0.8, rows=rows),
            name,
            chunk_size=chunk,
            n_rows=23,
        )
        loss.backward()
        return loss.detach(), zz.grad

    dense, dense_grad = run(None)
    chunked, chunked_grad = run(chunk_size)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked_grad, dense_grad, rtol=1e-10, atol=1e-12)


def test_chunked_with_tensors(rng):
    p, q = random_distributions(rng, 10, 6), random_distributions(rng, 10, 6)
    torch.testing.assert_close(
        bi.icon_loss(to_log(p), to_log(q), "jsd", chunk_size=3),
        bi.icon_loss(to_log(p), to_log(q), "jsd"),
    )
    with pytest.raises(ValueError, match="chunk_size"):
        bi.icon_loss(to_log(p), to_log(q), "jsd", chunk_size=0)


def test_callables_need_n_rows():
    with pytest.raises(ValueError, match="n_rows"):
        bi.icon_loss(lambda r: None, lambda r: None, "kl")


def test_validation_errors(rng):
    p, q = to_log(random_distributions(rng, 4, 5)), to_log(random_distributions(rng, 4, 5))
    with pytest.raises(ValueError, match="summing to 1"):
        bi.icon_loss(p, q + 0.5, "kl")
    with pytest.raises(ValueError, match="NaN"):
        bi.icon_loss(p, q.masked_fill(torch.eye(4, 5, dtype=torch.bool), math.nan), "kl")
    with pytest.raises(ValueError, match="shape"):
        bi.icon_loss(p, q[:, :4], "kl")
    with pytest.raises(ValueError, match="no mass"):
        bi.icon_loss(p, torch.full_like(q, -math.inf), "kl")
    with pytest.raises(ValueError, match="reduction"):
        bi.icon_loss(p, q, "kl", reduction="max")


def test_overflow_is_reported_not_returned():
    log_p = torch.log(torch.tensor([[0.5, 0.5]]))
    log_q = torch.tensor([[0.0, -200.0]])  # q = (1, 1e-87): chi2 ~ 1e86 > float32 max
    with pytest.raises(ValueError, match="overflowed torch.float32") as info:
        bi.icon_loss(log_p, log_q, "chi2")
    # the message names the usual cause and the remedies a CLI user has
    assert "kernel scale (sigma, dof, temperature)" in str(info.value)
    assert "bounded divergence" in str(info.value)
    assert math.isfinite(float(bi.icon_loss(log_p.double(), log_q.double(), "chi2")))


def test_infinite_divergence_names_remedy():
    y = torch.tensor([0, 0, 1, 1])
    with pytest.raises(bi.InfiniteDivergenceError, match="debias"):
        bi.icon_loss(kernels.labels(y), kernels.gaussian(torch.randn(4, 2)), "reverse_kl")
    # the documented remedy works
    log_p = kernels.debias(kernels.labels(y), 0.1)
    assert math.isfinite(
        float(bi.icon_loss(log_p, kernels.gaussian(torch.randn(4, 2)), "reverse_kl"))
    )


def test_chunked_memory_is_bounded():
    """Peak memory of the chunked path grows like chunk x n, not n x n."""
    from beyond_icon.profiling import peak_memory

    def peak(chunk, n):
        z = torch.randn(n, 16, requires_grad=True)
        y = torch.arange(n) % 8

        def step():
            bi.icon_loss(
                lambda rows: kernels.labels(y, rows=rows),
                lambda rows: kernels.gaussian(z, rows=rows),
                "jsd",
                chunk_size=chunk,
                n_rows=n,
            ).backward()

        return peak_memory(step) / (n * n * 4)  # in units of one n x n float32 matrix

    assert peak(None, 1024) > 2  # the whole n x n matrices (2.5 of them with the fused kernel)
    small, large = peak(64, 1024), peak(64, 2048)
    assert small < 1.0
    assert large < 0.6 * small  # relative to n^2 it halves as n doubles: O(chunk x n)


def test_block_of_empty_rows_stays_in_the_graph():
    """A chunk whose rows all lack mass contributes 0 but keeps a grad path (needed when a
    process's share of a distributed batch has no positive pair)."""
    y = torch.tensor([5, 6, 7, 0, 0, 1, 1, 0])  # rows 0-2 are singletons
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    from beyond_icon.loss import _sum_and_count

    total, count = _sum_and_count(
        lambda rows: kernels.labels(y, rows=rows, dtype=z.dtype),
        lambda rows: kernels.gaussian(z, rows=rows),
        divergences.get("tv"),
        slice(0, 3),
        None,
    )
    assert count == 0 and float(total.detach()) == 0.0 and total.requires_grad
    total.backward()
    assert torch.all(z.grad == 0)


def test_icon_loss_rows_returns_the_rows_with_mass():
    y = torch.tensor([0, 0, 1, 2, 2])  # row 2 has no positive
    z = torch.randn(5, 3, dtype=torch.float64)
    log_p, log_q = kernels.labels(y, dtype=torch.float64), kernels.gaussian(z)
    values, mask = bi.icon_loss_rows(log_p, log_q, "hellinger")
    assert mask.tolist() == [True, True, False, True, True]
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(values, divergences.hellinger(log_p[keep], log_q[keep]))
    torch.testing.assert_close(values.mean(), bi.icon_loss(log_p, log_q, "hellinger"))


def test_wrongly_typed_arguments_are_value_errors():
    from beyond_icon import methods

    log_p = torch.log_softmax(torch.randn(4, 4), dim=1)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        bi.icon_loss(log_p, log_p, chunk_size="8")
    with pytest.raises(ValueError, match="debias must be a number in"):
        methods.ClusterLoss(debias="0.1")


def test_trusted_path_skips_only_the_row_check():
    """Presets pass validate=False (p and q from the library's kernels): same value and
    gradient; a user's log_p handed to a preset is still checked."""
    from beyond_icon import methods

    z = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y = torch.arange(12) % 3
    log_q = bi.kernels.cosine(z)
    log_p = bi.kernels.labels(y, dtype=z.dtype)
    checked = bi.icon_loss(log_p, log_q, "tv")
    trusted = bi.icon_loss(log_p, log_q, "tv", validate=False)
    assert float(checked.detach()) == float(trusted.detach())
    bad = torch.zeros(12, 12, dtype=torch.float64)  # rows sum to 12, not 1
    with pytest.raises(ValueError, match="rows must be log-probabilities"):
        methods.ClusterLoss("tv")(z[:, :4], None, log_p=bad)
    with pytest.raises(ValueError, match="rows must be log-probabilities"):
        methods.SNE("tv")(None, z[:, :2], log_p=bad)


@pytest.mark.parametrize(
    "name, debias",
    [
        ("kl", 0.0),
        ("tv", 0.0),
        ("hellinger", 0.0),
        ("jsd", 0.0),
        ("chi2", 0.0),
        ("alpha:0.5", 0.0),
        ("alpha:-0.5", 0.1),
        ("reverse_kl", 0.1),
        ("jeffreys", 0.1),
    ],
)
def test_rows_without_mass_are_left_out_the_same_way_without_value_checks(name, debias):
    """A class seen once has an empty row of p. Without value checks it is evaluated as it is
    (f(0) finite) or with p := q, then masked: the same loss and gradient as the checked path."""
    from beyond_icon import methods, value_checks

    z = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3 appears once
    loss = methods.SupCon(name, metric="euclidean", debias=debias)
    checked_z = z.clone().requires_grad_()
    checked = loss(checked_z, labels)
    checked.backward()
    fast_z = z.clone().requires_grad_()
    with value_checks(False):
        fast = loss(fast_z, labels)
        fast.backward()
    torch.testing.assert_close(fast, checked)
    torch.testing.assert_close(fast_z.grad, checked_z.grad)
    assert torch.isfinite(fast_z.grad).all()


@pytest.mark.parametrize("name", ["kl", "tv", "jsd", "hellinger", "chi2", "alpha:0.5"])
@pytest.mark.parametrize("checks", [True, False])
def test_default_blocks_equal_one_block(monkeypatch, name, checks):
    """The default CPU evaluation goes through blocks of rows (loss.BLOCK_BYTES per tensor):
    with blocks of 2 to 3 rows the value and gradient equal those of one block."""
    from beyond_icon import loss as loss_module
    from beyond_icon import value_checks

    gen = torch.Generator().manual_seed(5)
    z = torch.randn(23, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (23,), generator=gen)
    y[0] = 99  # one empty row

    def run(block_bytes):
        monkeypatch.setattr(loss_module, "BLOCK_BYTES", block_bytes)
        zz = z.clone().requires_grad_()
        with value_checks(checks):
            value = bi.icon_loss(
                lambda rows: kernels.labels(y, rows=rows, dtype=zz.dtype),
                lambda rows: kernels.gaussian(zz, 0.8, rows=rows),
                name,
                n_rows=23,
            )
            value.backward()
        return value.detach(), zz.grad

    one, one_grad = run(2**40)
    blocked, blocked_grad = run(2 * 23 * 8)  # 2 rows of 23 float64 columns per block
    torch.testing.assert_close(blocked, one, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocked_grad, one_grad, rtol=1e-10, atol=1e-12)


def test_default_blocks_follow_the_width_of_q(monkeypatch):
    """The first block assumes a square q (m = n); a narrow q (classification, m = 3 classes)
    then gets blocks of its own width, and the rows are all counted once."""
    from beyond_icon import loss as loss_module

    calls = []
    monkeypatch.setattr(loss_module, "BLOCK_BYTES", 40 * 4 * 4)  # 4 rows of 40 float32 columns
    logits = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 3

    def log_q(rows):
        calls.append(rows)
        return torch.log_softmax(logits[rows], dim=-1)

    def log_p(rows):
        return torch.where(torch.nn.functional.one_hot(labels[rows], 3) > 0, 0.0, -math.inf)

    value = bi.icon_loss(log_p, log_q, "kl", n_rows=40)
    torch.testing.assert_close(value, torch.nn.functional.cross_entropy(logits, labels))
    assert calls[0] == slice(0, 4)  # 4 rows of the assumed 40 columns
    assert calls[1] == slice(4, 40)  # then the 3-column width allows all the rest at once


def test_fast_exp_of_log_probabilities():
    """divergences._exp: exp2-based on the CPU in float32 (torch's exp is slow on -inf and
    below -88), within |x| * 1e-7 relative of float64's exp; exactly 0 at -inf."""
    x = torch.cat([torch.linspace(-100.0, 0.0, 10001), torch.tensor([-math.inf])])
    for scale in (1.0, 0.5):
        fast = divergences._exp(x, scale)
        exact = (scale * x.double()).exp()
        assert fast[-1] == 0.0 and fast[-2] == 1.0
        finite = slice(0, -1)
        tolerance = 1e-7 * (1.0 + (scale * x[finite].double()).abs()) * exact[finite] + 1e-44
        assert ((fast[finite].double() - exact[finite]).abs() <= tolerance).all()
    assert divergences._exp(x.double()).equal(x.double().exp())  # float64: torch's exp


def test_a_shard_without_rows_stays_in_the_graph():
    """A rank whose share of the global batch is empty contributes an empty sum that is still
    connected to q (its backward must take part in the all-gather's reduction)."""
    from beyond_icon import value_checks
    from beyond_icon.distributed import Shard

    gen = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(6, 6, generator=gen), 1).requires_grad_()
    log_p = torch.log_softmax(torch.randn(6, 6, generator=gen), 1)
    shard = Shard(slice(3, 3), 6, 2)
    with value_checks(False):
        total, stats = bi.icon_loss(log_p, log_q, "kl", shard=shard, return_stats=True)
    assert total.requires_grad
    assert int(stats.n_rows) == 0
    # checked, and without a process group to add the other ranks' rows: the loss's own error
    with pytest.raises(ValueError, match="no mass"):
        bi.icon_loss(log_p, log_q, "kl", shard=shard)


def test_errors_in_later_blocks_name_the_rows_of_the_batch(monkeypatch):
    """The value checks of a block would count rows from the block's start: the error is
    raised with the row's number in the batch."""
    from beyond_icon import loss as loss_module

    monkeypatch.setattr(loss_module, "BLOCK_BYTES", 4 * 8 * 4)  # blocks of 4 rows of 8
    log_p = torch.log_softmax(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), 1)
    log_q = log_p.clone()
    log_q[6, 2] = -math.inf  # q = 0 < p in row 6 (the second block)
    log_q[6] = torch.log_softmax(log_q[6], 0)
    with pytest.raises(ValueError, match=r"row\(s\) \[6\]"):
        bi.icon_loss(log_p, log_q, "kl")


def test_mismatched_inputs_of_the_loss_are_named():
    log_p = torch.randn(4, 5).log_softmax(-1)
    log_q = torch.randn(4, 5).log_softmax(-1)
    # a float64 p against a float32 q: computed in the wider dtype (alpha:0.5 used to overflow
    # converting between them), as the float64 pair gives
    for name in ("alpha:0.5", "kl"):
        mixed = bi.icon_loss(log_p.double(), log_q, name)
        assert mixed.dtype == torch.float64
        torch.testing.assert_close(mixed, bi.icon_loss(log_p.double(), log_q.double(), name))
        torch.testing.assert_close(
            divergences.get(name)(log_p.double(), log_q),
            divergences.get(name)(log_p.double(), log_q.double()),
        )
    with pytest.raises(ValueError, match=r"returned \(4, 5\) for rows 0:7"):
        bi.icon_loss(lambda r: log_p[r], lambda r: log_q[r], "kl", n_rows=7)
    with pytest.raises(ValueError, match="n_rows must be a positive integer, got -1"):
        bi.icon_loss(lambda r: log_p[r], lambda r: log_q[r], "kl", n_rows=-1)
    with pytest.raises(ValueError, match=r"a row and a column at least, got \(0, 0\)"):
        bi.icon_loss(torch.zeros(0, 0), torch.zeros(0, 0), "kl")
