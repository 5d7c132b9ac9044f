"""Peak memory and host-sync counting; the presets' hot path makes no host sync."""

from __future__ import annotations

import pytest
import torch

from beyond_icon import divergences, methods, value_checks
from beyond_icon.profiling import HostSyncCounter

# reverse KL and Jeffreys are infinite on a SupCon p (zeros where q > 0): checked, they raise
SUPPORT_SAFE = [
    name.replace("alpha:A", "alpha:0.5")
    for name in divergences.names()
    if name not in ("reverse_kl", "jeffreys")
]


def test_counter_sees_value_reads_and_data_dependent_shapes():
    x = torch.randn(5)
    with HostSyncCounter() as syncs:
        bool(x.sum() > 0)
        x.max().item()
        x[x > 0]
        torch.nonzero(x)
        x * 2 + 1  # no sync
    assert syncs.count == 4, syncs.calls
    assert "test_profiling.py" in syncs.calls[0]


@pytest.mark.parametrize("divergence", SUPPORT_SAFE)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_supcon_step_makes_no_host_sync_without_value_checks(divergence, metric):
    torch.manual_seed(0)
    z = torch.randn(64, 8, requires_grad=True)
    labels = torch.randint(0, 5, (64,))
    loss = methods.SupCon(divergence=divergence, metric=metric)
    with HostSyncCounter() as checked:
        expected = loss(z, labels)
    with value_checks(False), HostSyncCounter() as syncs:
        value = loss(z, labels)
        value.backward()
    assert checked.count > 0  # the default checks read values back
    assert syncs.count == 0, syncs.calls
    torch.testing.assert_close(value, expected)


def test_fitted_tsne_step_makes_no_host_sync_without_value_checks(tmp_path):
    from beyond_icon.affinity import PerplexityAffinity

    x = torch.randn(120, 5, generator=torch.Generator().manual_seed(1)).numpy()
    affinity = PerplexityAffinity(perplexity=10, cache_dir=str(tmp_path)).fit(x)
    tsne = methods.TSNE(perplexity=10, affinity=affinity, divergence="jsd")
    z = torch.randn(40, 2, requires_grad=True)
    indices = torch.arange(0, 120, 3)
    expected = tsne(None, z, indices=indices)
    with value_checks(False), HostSyncCounter() as syncs:
        value = tsne(None, z, indices=indices)
        value.backward()
    assert syncs.count == 0, syncs.calls
    torch.testing.assert_close(value, expected)


def test_step_time_warms_up_then_averages_the_timed_calls():
    """One warm-up call, then ``repeats`` timed ones; the mean covers each call's work."""
    import time

    from beyond_icon.profiling import step_time

    calls = []

    def step():
        calls.append(1)
        time.sleep(0.01)

    seconds = step_time(step, 3)
    assert len(calls) == 4
    assert 0.01 <= seconds < 1.0


def test_data_dependent_ops_beyond_nonzero_are_counted():
    x = torch.tensor([1, 1, 2, 3, 3])
    with HostSyncCounter() as syncs:
        torch.unique_consecutive(x, return_counts=True)
        torch.bincount(x)
        torch.repeat_interleave(x)
        torch.equal(x, x)
        torch.repeat_interleave(x, x, output_size=int(x.sum()))  # int(): one read
        x.repeat_interleave(3)  # an integer repeats: the length is known, no sync
    names = [call.split()[0] for call in syncs.calls]
    assert names.count("repeat_interleave") == 1, syncs.calls
    for name in ("unique_consecutive", "bincount", "equal"):
        assert name in names, syncs.calls
