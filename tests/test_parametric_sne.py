"""ParametricSNE: the scikit-learn protocol, the default recipe's quality, both affinities."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

import beyond_icon as bi
from beyond_icon import data, metrics
from beyond_icon.models import CellMLP
from beyond_icon.parametric_sne import ParametricSNE

FAST = {"n_steps": 6, "batch_size": 100, "perplexity": 10.0, "device": "cpu"}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").subset(300, 100)


@pytest.fixture(params=["exact", "two-level"])
def lookup(request, monkeypatch):
    """Both cell lookups of CellMLP: the exact one of small data (the 60 cells of 300 digits)
    and the two-level one of 1,024 cells and more, here from 20 cells (6 centres, lists of at
    least 10)."""
    from beyond_icon.models import CellMLP

    if request.param == "two-level":
        monkeypatch.setattr(CellMLP, "TWO_LEVEL_FROM", 20)
        monkeypatch.setattr(CellMLP, "COARSE", 6)
        monkeypatch.setattr(CellMLP, "MIN_CANDIDATES", 10)
    return request.param


def _two_level(est) -> bool:
    return est.model_[2]._two_level()


def test_defaults_separate_well_separated_clusters():
    """The default estimator, untouched: 5-NN accuracy of new points above 0.95 (the pattern
    of openTSNE's test_iris). Ten Gaussian clusters in 20 dimensions, 1,000 + 500 points."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(10, 20))
    y = rng.integers(0, 10, 1500)
    x = (centres[y] + rng.normal(size=(1500, 20))).astype(np.float32)
    est = bi.ParametricSNE(device="cpu")
    train = est.fit_transform(x[:1000])
    test = est.transform(x[1000:])
    assert metrics.knn_accuracy(train, y[:1000], test, y[1000:], 5) > 0.95
    assert metrics.trustworthiness(x[1000:], test, k=10) > 0.9
    assert 3000 <= est.n_steps_ < 3003 and est.affinity_ is not None  # the floor, whole epochs


@pytest.mark.parametrize("divergence", ["kl", "tv", "jsd", "hellinger"])
@pytest.mark.parametrize("kernel", ["student_t", "gaussian"])
def test_every_divergence_and_kernel_trains(digits, divergence, kernel):
    est = ParametricSNE(divergence=divergence, kernel=kernel, **{**FAST, "n_steps": 40})
    emb = est.fit_transform(digits.x_train)
    assert emb.shape == (300, 2) and np.isfinite(emb).all()
    losses = [h["loss"] for h in est.history_]
    assert np.isfinite(losses).all() and len(losses) == 42  # whole epochs of 3 steps


def test_round_trip_and_seeds(digits):
    est = ParametricSNE(divergence="jsd", random_state=3, **FAST)
    emb = est.fit_transform(digits.x_train)
    assert emb.shape == (300, 2) and np.isfinite(emb).all()
    assert {"loss", "grad_norm", "lr"} <= set(est.history_[0])
    np.testing.assert_allclose(
        ParametricSNE(divergence="jsd", random_state=3, **FAST).fit_transform(digits.x_train),
        emb,
        rtol=1e-5,
        atol=1e-6,
    )
    other = ParametricSNE(divergence="jsd", random_state=4, **FAST).fit_transform(digits.x_train)
    assert not np.allclose(other, emb)


def test_transform_of_one_point_equals_its_row(digits, lookup):
    est = ParametricSNE(**FAST).fit(digits.x_train)
    assert _two_level(est) == (lookup == "two-level")
    many = est.transform(digits.x_test)
    for i in (0, 7, 99):
        np.testing.assert_allclose(est.transform(digits.x_test[i : i + 1])[0], many[i], atol=1e-5)
    np.testing.assert_allclose(est.transform(digits.x_train), est.embedding_, atol=1e-6)
    est._TRANSFORM_ROWS = 64  # the PCA layer in several blocks, the rest at once
    np.testing.assert_allclose(est.transform(digits.x_test), many, atol=1e-5)


def test_transform_of_uint8_pixels_equals_that_of_their_floats(digits, lookup):
    """``transform`` folds 1 / 255 into the PCA layer's weight for uint8 inputs: the same
    embedding as the floats in [0, 1] (64 pixels > the 50 PCA components, so the PCA layer)."""
    pixels = digits.x_train
    assert pixels.dtype == np.uint8
    est = ParametricSNE(**FAST).fit(pixels)
    assert isinstance(est.model_[0], type(est.projection_)) and est.projection_ is not None
    floats = pixels.astype(np.float32) / 255
    np.testing.assert_allclose(est.transform(pixels), est.transform(floats), atol=1e-5)
    with torch.no_grad():  # the network as trained: the floats through every layer
        direct = est.model_.eval()(torch.from_numpy(floats)).numpy()
        projection, body = est.model_[0], est.model_[2]
        raw = torch.from_numpy(pixels.reshape(len(pixels), -1)).float()
        assert torch.equal(  # the same cells: no point changed sides between two landmarks
            body.cells(projection(raw, input_scale=1 / 255)),
            body.cells(projection(torch.from_numpy(floats))),
        )
    np.testing.assert_allclose(est.transform(pixels), direct, atol=1e-5)


def test_transform_folds_the_cells_maps_through_the_head(digits, lookup, monkeypatch):
    """``transform`` goes through ``CellMLP.embed`` (the maps folded through the linear head)
    and gives the network's own output, with maps far from their start."""
    est = ParametricSNE(**FAST).fit(digits.x_train)
    floats = digits.x_test.astype(np.float32) / 255
    before = est.transform(floats)
    body = est.model_[2]
    with torch.no_grad():
        body.local.weight.normal_(generator=torch.Generator().manual_seed(0))
    calls = []
    embed = CellMLP.embed
    monkeypatch.setattr(
        CellMLP, "embed", lambda self, x, head: calls.append(len(x)) or embed(self, x, head)
    )
    out = est.transform(floats)
    assert calls == [len(floats)] and np.abs(out - before).max() > 0.1  # the maps count
    with torch.no_grad():
        direct = est.model_.eval()(torch.from_numpy(floats)).numpy()
    np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-4)
    # more outputs than the maps' directions: the unfolded path, the same function
    wide = ParametricSNE(**{**FAST, "n_components": 6}).fit(digits.x_train)
    calls.clear()
    with torch.no_grad():
        expected = wide.model_.eval()(torch.from_numpy(floats)).numpy()
    np.testing.assert_allclose(wide.transform(floats), expected, rtol=1e-5, atol=1e-5)
    assert calls == []


def test_interrupted_fit_resumes_to_the_same_result(digits, tmp_path, monkeypatch, lookup):
    import beyond_icon.parametric_sne as module

    params = {**FAST, "n_steps": 12, "divergence": "hellinger", "exaggeration_fraction": 0.5}
    whole = ParametricSNE(**params).fit(digits.x_train)
    real_fit = module.fit
    monkeypatch.setattr(
        module, "fit", lambda *a, **k: real_fit(*a, **{**k, "stop_after_epochs": 2})
    )
    ParametricSNE(**params).fit(digits.x_train, out_dir=tmp_path)  # killed after 2 of 4 epochs
    monkeypatch.setattr(module, "fit", real_fit)
    resumed = ParametricSNE(**params).fit(digits.x_train, out_dir=tmp_path, resume=True)
    assert [h["step"] for h in resumed.history_] == list(range(12))
    np.testing.assert_allclose(
        [h["loss"] for h in resumed.history_], [h["loss"] for h in whole.history_], rtol=1e-6
    )
    np.testing.assert_allclose(resumed.embedding_, whole.embedding_, rtol=1e-5, atol=1e-5)


def test_resume_on_other_points_is_refused(digits, tmp_path):
    """The checkpoint keeps a fingerprint of X: resuming on other points of the same shape is
    refused by name, not continued on an affinity fitted to different data."""
    params = {**FAST, "n_steps": 6}
    ParametricSNE(**params).fit(digits.x_train, out_dir=tmp_path)
    other = digits.x_train[::-1].copy()
    with pytest.raises(ValueError, match="data_fingerprint: '300x1x8x8 uint8 #"):
        ParametricSNE(**{**params, "n_steps": 12}).fit(other, out_dir=tmp_path, resume=True)


def test_batch_affinity_is_the_papers_per_batch_p(digits):
    est = ParametricSNE(affinity="batch", **FAST).fit(digits.x_train)
    assert est.affinity_ is None and len(est.history_) == 6
    with pytest.raises(ValueError, match="perplexity 200 needs batches"):
        ParametricSNE(affinity="batch", **{**FAST, "perplexity": 200.0}).fit(digits.x_train)


def test_images_vectors_and_raw_inputs(digits):
    images = digits.x_train.reshape(-1, 1, 8, 8)
    est = ParametricSNE(**FAST).fit(images)  # images, MLP on PCA features on the CPU
    assert est.transform(images[:5]).shape == (5, 2)
    raw = ParametricSNE(pca_components=None, n_components=3, **FAST).fit(digits.x_train)
    assert raw.projection_ is None and raw.embedding_.shape == (300, 3)
    cnn = ParametricSNE(backbone="cnn", **{**FAST, "n_steps": 2}).fit(images)
    assert np.isfinite(cnn.embedding_).all()


def test_auto_backbone_is_the_mlp_for_images_on_any_device(digits):
    """auto (the default) builds the MLP on the PCA features for images on a GPU too (the CNN
    was measured not to pay there); cnn builds the CNN. Built, not run: no GPU is needed."""
    from beyond_icon.parametric_sne import MLP

    images = torch.as_tensor(digits.x_train.reshape(-1, 1, 8, 8), dtype=torch.float32)
    est = ParametricSNE(**FAST)
    projection, _ = est._input_space(images.reshape(len(images), -1))
    for device in ("cpu", "cuda"):
        network = est._network(images, projection, torch.device(device))
        assert isinstance(network[2], MLP), device
    cnn = ParametricSNE(backbone="cnn", **FAST)._network(images, projection, torch.device("cuda"))
    assert not isinstance(cnn[2], MLP)


def test_default_cells_of_the_mlp_input(digits):
    """The default MLP carries n / 5 k-means cells of its inputs (at most MAX_CELLS); n_cells=0
    is the plain MLP; the CNN has none; data with fewer distinct points get fewer cells."""
    from beyond_icon.models import MLP, CellMLP
    from beyond_icon.parametric_sne import MAX_CELLS

    est = ParametricSNE(**FAST).fit(digits.x_train)
    body = est.model_[2]
    assert isinstance(body, CellMLP) and len(body.landmarks) == 60  # 300 / 5
    widths = [layer.out_features for layer in body.net if isinstance(layer, torch.nn.Linear)]
    assert widths == [128, 128]  # the default hidden
    features = torch.as_tensor(est.input_features(digits.x_train)) / est.projection_.scale
    centres = body.landmarks
    cells = torch.cdist(features, centres).argmin(1)  # every cell holds training points
    assert set(cells.tolist()) == set(range(60))
    assert ParametricSNE()._cells(10**6) == MAX_CELLS and ParametricSNE()._cells(9) == 0
    plain = ParametricSNE(n_cells=0, **FAST).fit(digits.x_train)
    assert type(plain.model_[2]) is MLP
    wide = ParametricSNE(n_cells=0, hidden=[256, 256], **FAST).fit(digits.x_train)
    widths = [layer.out_features for layer in wide.model_[2].net if hasattr(layer, "weight")]
    assert widths == [256, 256]  # the previous default, as a list from the CLI
    assert ParametricSNE(backbone="cnn")._cells(300) == 0
    x = np.repeat(np.eye(3, 4, dtype=np.float32), 10, axis=0)  # 3 distinct points
    few = ParametricSNE(n_cells=6, **{**FAST, "perplexity": 3.0}).fit(x)
    assert len(few.model_[2].landmarks) == 3


def test_training_looks_cells_up_among_the_clean_cells_neighbours(digits, monkeypatch, lookup):
    """While training, a noisy input's cell is searched among the NEAR_CELLS cells nearest
    its clean input's cell. Without noise the clean cell itself is the answer, so even with
    NEAR_CELLS = 2 training is the same as with the full lookup; with noise it is the full
    lookup wherever the candidates hold the nearest cell."""
    import beyond_icon.parametric_sne as module
    from beyond_icon.models import CellMLP

    monkeypatch.setattr(module, "NEAR_CELLS", 2)
    quiet = {**FAST, "input_noise": 0.0}
    near = ParametricSNE(**quiet).fit(digits.x_train).embedding_
    searched = []
    real = CellMLP.nearest_among

    def full(self, x, candidates):
        searched.append(candidates.shape[1])
        found = real(self, x, candidates)
        assert torch.equal(found, self.cells(x))  # no noise: the clean cell is a candidate
        return self.cells(x)

    monkeypatch.setattr(CellMLP, "nearest_among", full)
    np.testing.assert_array_equal(ParametricSNE(**quiet).fit(digits.x_train).embedding_, near)
    assert searched == [2] * FAST["n_steps"]
    seen = []  # with noise, the noisy inputs are looked up, among their clean cells' neighbours
    monkeypatch.setattr(CellMLP, "nearest_among", lambda s, x, c: seen.append(x) or real(s, x, c))
    est = ParametricSNE(**FAST).fit(digits.x_train)
    clean = torch.as_tensor(est.input_features(digits.x_train)) / est.projection_.scale
    assert len(seen) == FAST["n_steps"] and torch.cdist(seen[0], clean).min(1).values.min() > 0.1


def test_training_lowers_the_loss(digits):
    est = ParametricSNE(divergence="tv", **{**FAST, "n_steps": 90, "exaggeration": 1.0})
    est.fit(digits.x_train)
    losses = [h["loss"] for h in est.history_]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.02


def test_get_params_come_from_init():
    names = [p for p in inspect.signature(ParametricSNE).parameters]
    assert list(ParametricSNE().get_params()) == sorted(names)
    est = ParametricSNE().set_params(dof=0.5, sigma=2.0)
    assert est.get_params()["dof"] == 0.5 and est.get_params()["sigma"] == 2.0
    with pytest.raises(ValueError, match="Invalid parameter"):
        ParametricSNE().set_params(bogus=1)


@pytest.mark.parametrize(
    "x, params, message",
    [
        (np.full((20, 4), np.nan), {}, "NaN"),
        (np.zeros((1, 4)), {}, "at least 3 samples"),
        (np.zeros((20, 4)), {"perplexity": 20.0}, "perplexity 20 needs more"),
        (np.zeros((20, 4)), {"kernel": "cauchy"}, "kernel"),
        (np.zeros((20, 4)), {"affinity": "local"}, "affinity"),
        (np.zeros((20, 4)), {"q_scope": "local"}, "q_scope"),
        (np.zeros((20, 4)), {"divergence": "nope"}, "unknown divergence"),
        (np.zeros((20, 4)), {"n_steps": 0}, "n_steps"),
        (np.zeros((20, 4)), {"n_cells": -1}, "n_cells must be an integer >= 0"),
        (np.zeros((20, 4)), {"n_cells": 2.5}, "n_cells must be an integer >= 0"),
        (np.zeros((20, 4)), {"n_cells": True}, "n_cells must be an integer >= 0"),
        (np.zeros((20, 4)), {"n_cells": 21}, "more than the 20 training points"),
        (np.zeros((20, 4)), {"local_dims": -1}, "local_dims must be an integer >= 0"),
        (np.zeros((20, 4)), {"local_dims": 2.0}, "local_dims must be an integer >= 0"),
        (np.zeros((20, 4)), {"local_dims": False}, "local_dims must be an integer >= 0"),
        (np.zeros((20, 4)), {"hidden": ()}, "hidden must be a non-empty sequence"),
        (np.zeros((20, 4)), {"hidden": (64, 0)}, "hidden must be a non-empty sequence"),
        (np.zeros((20, 4)), {"hidden": 64}, "hidden must be a non-empty sequence"),
        (np.zeros((20, 4)), {"hidden": (64.0,)}, "hidden must be a non-empty sequence"),
        (np.zeros((20, 4, 1, 1)), {"n_cells": 4, "backbone": "cnn"}, "n_cells applies to the MLP"),
        (np.zeros((20, 4)), {"input_noise": -1.0}, "input_noise"),
        (np.zeros((20, 4)), {"input_noise_power": -0.5}, "input_noise_power must be a number"),
        (np.zeros((20, 4)), {"input_noise_power": "half"}, "input_noise_power must be a number"),
        (np.zeros((20, 4)), {"input_noise_power": True}, "input_noise_power must be a number"),
        (np.zeros((20, 4)), {"exaggeration_fraction": 2.0}, "exaggeration_fraction"),
        (np.zeros(20), {}, "Expected 2D array"),
        (np.array([["a", "b"]] * 5), {}, "could not convert"),
        (np.zeros((20, 4)), {"exaggeration_fraction": "a"}, "exaggeration_fraction must be a"),
        (np.zeros((20, 4)), {"random_state": None}, "random_state must be an integer"),
        (np.zeros((20, 4)), {"pca_components": -1}, "pca_components must be an integer >= 0"),
        (np.zeros((20, 4)), {"pca_components": 2.5}, "pca_components must be an integer >= 0"),
        (np.zeros((20, 4)), {"pca_components": True}, "pca_components must be an integer >= 0"),
        (np.zeros((20, 4)), {"n_neighbors": 0}, "n_neighbors must be a positive integer"),
        (np.zeros((20, 4)), {"n_neighbors": 4}, "n_neighbors = 4 is below the perplexity 5"),
        (np.zeros((20, 4)), {"n_neighbors": 20}, "n_neighbors = 20 needs more than 20"),
        (np.zeros((20, 4)), {"divergence": "reverse_kl"}, "infinite where p = 0 < q"),
        (np.zeros((20, 4)), {"divergence": "alpha:0"}, "infinite where p = 0 < q"),
        (np.ones((20, 4)), {}, "no spread: all 20 rows are the same point"),
        (np.ones((20, 64)), {}, "no spread: all 20 rows are the same point"),  # with the PCA
        (np.array([[1e39, 0.0]] + [[i, -i] for i in range(19)]), {}, "beyond float32's range"),
    ],
)
def test_bad_input(x, params, message):
    with pytest.raises(ValueError, match=message):
        ParametricSNE(**{"n_steps": 1, "perplexity": 5.0, **params}).fit(x)


def test_transform_before_fit_and_wrong_shape(digits):
    with pytest.raises(NotFittedError, match="not fitted"):
        ParametricSNE().transform(digits.x_test)
    est = ParametricSNE(**FAST).fit(digits.x_train)
    with pytest.raises(ValueError, match="sample shape"):
        est.transform(np.zeros((3, 63), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.full((3, 1, 8, 8), np.nan, dtype=np.float32))


def test_numpy_numbers_are_parameters_like_python_ones(digits):
    """GridSearchCV passes numpy scalars: they give what the same Python numbers give."""
    numpy_params = {
        "perplexity": np.int64(10),
        "batch_size": np.int64(100),
        "n_steps": np.int64(6),
        "lr": np.float32(2**-8),
        "input_noise": np.float32(0.25),
        "exaggeration_fraction": np.float32(0.5),
        "random_state": np.int64(3),
    }
    python_params = {k: v.item() for k, v in numpy_params.items()}
    ours = ParametricSNE(device="cpu", **numpy_params).fit_transform(digits.x_train)
    same = ParametricSNE(device="cpu", **python_params).fit_transform(digits.x_train)
    np.testing.assert_array_equal(ours, same)


def test_divergences_infinite_at_p_zero_train_with_the_batch_affinity(digits):
    """reverse_kl is refused with the sparse fitted p (above) but trains on the dense p of a
    batch."""
    est = ParametricSNE(**{**FAST, "divergence": "reverse_kl", "affinity": "batch"})
    assert np.isfinite(est.fit_transform(digits.x_train)).all()


def test_the_scale_of_the_inputs_does_not_change_p():
    """Inputs at 1e-20 (squared distances below float32's smallest normal number) or 1e20 give
    the p of the same inputs at their own scale, not a p of rounding noise."""
    x = data.load("digits").subset(300, 100).x_train.reshape(300, -1).astype(np.float64)
    settings = {**FAST, "pca_components": None}
    reference = ParametricSNE(**settings).fit(x).affinity_.P_
    for scale in (1e-20, 1e20):
        P = ParametricSNE(**settings).fit(x * scale).affinity_.P_
        np.testing.assert_allclose(P.toarray(), reference.toarray(), rtol=1e-5, atol=1e-12)


def test_inputs_whose_rescaling_factor_is_beyond_float32_stay_finite():
    """A spread of 1e-40 (float32 subnormals) needs a factor of 2^133, itself beyond float32."""
    from beyond_icon.parametric_sne import _float32_safe

    x = torch.tensor([[1e-40, 0.0], [3e-40, 2e-40], [0.0, 1e-40]])
    scaled = _float32_safe(x)
    assert torch.isfinite(scaled).all() and 0.1 < float(scaled.std()) < 10
    ordinary = x * 1e39  # a spread of about 0.1: left as it is
    assert _float32_safe(ordinary) is ordinary


def test_transform_names_diverged_weights(digits):
    est = ParametricSNE(**FAST).fit(digits.x_train)
    with torch.no_grad():
        est.model_[-1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weights are not finite"):
        est.transform(digits.x_test)


def test_fewer_points_than_pca_components():
    """PCA to as many components as points when there are fewer than ``pca_components``."""
    x = data.load("digits").subset(300, 100).x_train[:20]  # 64 pixels, 20 points
    est = ParametricSNE(**{**FAST, "perplexity": 2.0}).fit(x)
    assert est.projection_.components.shape[0] == 20 and np.isfinite(est.embedding_).all()


def test_transform_refuses_inputs_on_another_scale(digits):
    """uint8 is scaled by 1/255: a uint8 X for a model fitted on floats beyond [0, 1], or floats
    beyond [0, 1] for a model fitted on uint8, would be silently wrong; floats in [0, 1] for
    a uint8 model are its scale (the test of uint8 pixels above)."""
    pixels = digits.x_train
    on_pixels = ParametricSNE(**FAST).fit(pixels)
    with pytest.raises(ValueError, match=r"fitted on uint8 inputs.*float in \[0, 255\]"):
        on_pixels.transform(pixels[:5].astype(np.float32))
    on_floats = ParametricSNE(**FAST).fit(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"X is uint8.*float inputs in \[0, 255\]"):
        on_floats.transform(pixels[:5])
    with pytest.raises(ValueError, match=r"X has sample shape \(10,\)"):
        on_floats.input_features(np.zeros((3, 10), dtype=np.float32))
    wide = np.zeros((2, 1, 8, 8))
    wide[0, 0, 0, 0] = 1e39  # finite in float64, not in float32
    with pytest.raises(ValueError, match=r"beyond float32's range.*rows \[0\]"):
        on_floats.transform(wide)


# scikit-learn's estimator checks on a tiny configuration; each expected failure has its reason
EXPECTED_FAILURES: dict[str, str] = {}


def _tiny() -> ParametricSNE:
    return ParametricSNE(n_steps=3, perplexity=2.0, batch_size=16, device="cpu")


try:
    from sklearn.utils.estimator_checks import parametrize_with_checks
except ImportError:  # pragma: no cover
    parametrize_with_checks = None


if parametrize_with_checks is not None:

    @parametrize_with_checks([_tiny()], expected_failed_checks=lambda _: EXPECTED_FAILURES)
    def test_sklearn_estimator_checks(estimator, check):
        check(estimator)


def test_perplexity_below_one_is_named():
    from beyond_icon import ParametricSNE

    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="perplexity must be >= 1"):
        ParametricSNE(perplexity=0.5, n_steps=1).fit(x)


def test_cells_k_means_on_a_sample_of_large_data(monkeypatch):
    """Beyond POINTS_PER_CELL rows per centroid the k-means of the cells fits a random sample
    (the same for a seed); its centres are still the data's clusters."""
    from sklearn.cluster import KMeans

    import beyond_icon.parametric_sne as module

    monkeypatch.setattr(module, "POINTS_PER_CELL", 32)
    rows, real_fit = [], KMeans.fit
    monkeypatch.setattr(KMeans, "fit", lambda self, x: (rows.append(len(x)), real_fit(self, x))[1])
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z = torch.as_tensor(centres[rng.integers(0, 4, 2000)] + rng.normal(size=(2000, 2)) * 0.1)
    fitted = module._kmeans_centres(z.float(), 4, seed=0)
    assert fitted.shape == (4, 2) and rows == [128]  # 32 rows per centroid, not 2,000
    found = sorted(map(tuple, np.round(fitted.numpy()).astype(int).tolist()))
    assert found == [(0, 0), (0, 10), (10, 0), (10, 10)]
    torch.testing.assert_close(module._kmeans_centres(z.float(), 4, seed=0), fitted)


def test_cells_take_any_seed_of_the_tasks_and_old_pickles_load(digits):
    """Seeds beyond scikit-learn's 32 bits (the tasks allow up to 2^63) reach the k-means of
    the cells; an estimator pickled before n_cells, hidden and q_scope existed loads as the
    plain 256-256 MLP with q for the train split that it was."""
    import pickle

    est = ParametricSNE(**{**FAST, "n_steps": 2, "random_state": 2**40}).fit(digits.x_train)
    assert np.isfinite(est.embedding_).all()
    state = est.__getstate__()
    del state["n_cells"], state["hidden"], state["q_scope"], state["input_noise_power"]
    del state["local_dims"]
    old = ParametricSNE.__new__(ParametricSNE)
    old.__setstate__(state)
    assert old.get_params()["n_cells"] == 0 and old.get_params()["hidden"] == (256, 256)
    assert old.get_params()["q_scope"] == "global"  # before q_scope existed: the train split's
    assert old.get_params()["input_noise_power"] == 0.0  # before it: the same on every feature
    assert old.get_params()["local_dims"] == 0  # before the cells' own maps: none
    np.testing.assert_allclose(
        pickle.loads(pickle.dumps(old)).transform(digits.x_test), est.transform(digits.x_test)
    )


def test_q_scope_auto_is_global_for_kl_only(digits):
    """``q_scope="auto"`` (the default): t-SNE's normaliser for KL, the batch's for the others;
    an explicit scope is kept whatever the divergence."""
    from beyond_icon.parametric_sne import resolve_q_scope

    assert ParametricSNE().q_scope == "auto"
    assert resolve_q_scope("auto", "kl") == "global"
    for name in ("tv", "jsd", "hellinger", "chi2", "reverse_kl", "alpha:0.5"):
        assert resolve_q_scope("auto", name) == "batch"
    from beyond_icon import divergences

    for kl in ("KL", "alpha:1", divergences.kl, divergences.get("kl")):  # KL by its function
        assert resolve_q_scope("auto", kl) == "global"

    def kl(log_p, log_q):  # a user's divergence that only shares KL's name
        return divergences.tv(log_p, log_q)

    assert resolve_q_scope("auto", kl) == "batch"
    assert resolve_q_scope("batch", "kl") == "batch"
    assert resolve_q_scope("global", "tv") == "global"
    for divergence, affinity, scope in (
        ("kl", "global", "global"),
        ("tv", "global", "batch"),
        ("kl", "batch", "batch"),  # p per batch: q is the batch's plain kernel
    ):
        est = ParametricSNE(divergence=divergence, affinity=affinity, **FAST)
        assert est.fit(digits.x_train).q_scope_ == scope
    # the resolved scope is what the loss used: auto and its resolution give the same fit
    np.testing.assert_allclose(
        ParametricSNE(q_scope="global", **FAST).fit_transform(digits.x_train),
        ParametricSNE(**FAST).fit_transform(digits.x_train),
        rtol=1e-6,
        atol=1e-6,
    )
    assert not np.allclose(
        ParametricSNE(q_scope="batch", **FAST).fit_transform(digits.x_train),
        ParametricSNE(**FAST).fit_transform(digits.x_train),
    )


def test_noise_weights_share_the_noise_by_each_features_spread():
    """w_j proportional to sd_j ** power, mean w_j^2 = 1; power 0 (or no spread) gives None."""
    from beyond_icon.parametric_sne import noise_weights

    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([4.0, 1.0, 0.25, 0.0])
    z = torch.randn(20000, 4, generator=generator, dtype=torch.float64) * spread
    sd = z.std(0)
    for power in (0.5, 1.0, 2.0):
        weight = noise_weights(z, power)
        expected = sd.pow(power) / sd.pow(power).pow(2).mean().sqrt()
        torch.testing.assert_close(weight, expected.float())
        assert float(weight.pow(2).mean()) == pytest.approx(1.0, rel=1e-6)
        assert weight[3] == 0  # a feature that never varies gets no noise
    assert noise_weights(z, 0.0) is None and noise_weights(torch.ones(50, 3), 0.5) is None


def test_input_noise_is_weighted_per_feature_in_training_only():
    from beyond_icon.parametric_sne import InputNoise

    weight = torch.tensor([2.0, 1.0, 0.0])
    noise = InputNoise(0.3, weight)
    x = torch.zeros(40000, 3)
    torch.manual_seed(0)
    measured = noise.train()(x).std(0)
    torch.testing.assert_close(measured, 0.3 * weight, atol=0.006, rtol=0)
    assert torch.equal(noise.eval()(x), x)
    assert "weighted per feature" in repr(noise)
    assert torch.equal(noise.state_dict()["weight"], weight[None])  # a buffer: saved, moved
    assert noise.double().weight.dtype == torch.float64
    plain = InputNoise(0.3)  # no weight: the same noise on every feature, as before
    assert plain.weight is None and "weighted" not in repr(plain)
    torch.manual_seed(0)
    torch.testing.assert_close(plain.train()(x).std(0), torch.full((3,), 0.3), atol=0.006, rtol=0)
    old = InputNoise(0.3)  # an InputNoise pickled before the weight existed has no such buffer
    del old._buffers["weight"]
    torch.manual_seed(0)
    torch.testing.assert_close(old.train()(x).std(0), torch.full((3,), 0.3), atol=0.006, rtol=0)
    assert repr(old) == "InputNoise(std=0.3)"


def test_the_default_weights_the_noise_by_the_pca_spread_and_power_0_does_not(digits):
    """The default MLP's noise follows the PCA components' spread (power 0.5); power 0 is the
    earlier recipe's noise, the same on every feature."""
    from beyond_icon.parametric_sne import noise_weights

    est = ParametricSNE(**FAST).fit(digits.x_train)
    weight = est.model_[1].weight.flatten()
    inputs = torch.as_tensor(est.input_features(digits.x_train)) / est.projection_.scale
    torch.testing.assert_close(weight, noise_weights(inputs, 0.5), rtol=1e-4, atol=1e-5)
    assert weight[0] > 1 > weight[-1]  # more on the leading components, less on the last
    flat = ParametricSNE(**{**FAST, "input_noise_power": 0.0}).fit(digits.x_train)
    assert flat.model_[1].weight is None
    assert not np.allclose(flat.embedding_, est.embedding_)
    raw = ParametricSNE(**{**FAST, "pca_components": None, "n_cells": 0}).fit(digits.x_train)
    pixels = torch.as_tensor(digits.x_train.reshape(len(digits.x_train), -1), dtype=torch.float32)
    expected = noise_weights(raw.model_[0](pixels), 0.5)
    torch.testing.assert_close(raw.model_[1].weight.flatten(), expected)
    assert expected.min() == 0  # digits' always-blank corner pixels get no noise


def test_local_dims_gives_each_cell_its_map_along_its_own_directions(digits):
    est = ParametricSNE(**FAST).fit(digits.x_train)
    body = est.model_[2]
    assert isinstance(body, CellMLP) and body.local_dims == 5  # the default
    assert body.local_basis.shape == (len(body.landmarks), 5, body.landmarks.shape[1])
    assert body.local_basis.abs().sum() > 0
    plain = ParametricSNE(**{**FAST, "local_dims": 0}).fit(digits.x_train)
    assert getattr(plain.model_[2], "local_basis", None) is None
    assert isinstance(plain.model_[2], CellMLP)
