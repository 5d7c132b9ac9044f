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
