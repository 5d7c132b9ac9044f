"""The training loop: exact resumption, checkpoints, schedules."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from beyond_icon import methods
from beyond_icon.parametric_sne import RECIPE
from beyond_icon.train import TrainConfig, _lr_factor, fit


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4)
    )
    x = torch.randn(64, 6)
    y = torch.arange(64) % 4
    loss = methods.SupCon("jsd", metric="euclidean")

    def batches(generator):
        return torch.randperm(64, generator=generator).split(16)

    def loss_fn(index):
        noisy = x[index] + 0.1 * torch.randn(len(index), 6)  # global RNG: restored on resume
        return loss(model(noisy), y[index])

    return model, batches, loss_fn


def test_resume_equals_uninterrupted(tmp_path):
    config = TrainConfig(epochs=4, lr=1e-2, schedule="cosine", warmup_epochs=1, seed=5)
    model, batches, loss_fn = _setup()
    full = fit(model, batches, loss_fn, config, device=torch.device("cpu"), verbose=False)
    reference = [p.detach().clone() for p in model.parameters()]

    model, batches, loss_fn = _setup()
    fit(
        model,
        batches,
        loss_fn,
        config,
        device=torch.device("cpu"),
        out_dir=tmp_path,
        verbose=False,
        stop_after_epochs=2,
    )
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "history.csv").is_file()
    model, batches, loss_fn = _setup()  # a fresh process would start from fresh weights
    resumed = fit(
        model,
        batches,
        loss_fn,
        config,
        device=torch.device("cpu"),
        out_dir=tmp_path,
        resume=True,
        verbose=False,
    )
    for a, b in zip(reference, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert not list(tmp_path.glob("*.tmp"))


def test_schedules():
    cosine = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    assert _lr_factor(cosine, 0.0) < 0.01 and _lr_factor(cosine, 2.0) == pytest.approx(1.0)
    assert _lr_factor(cosine, 10.0) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(epochs=30, schedule="step")  # halved at 1/3 and 2/3 of the budget
    assert [_lr_factor(step, e) for e in (0, 9.9, 10, 25, 29.9)] == [1.0, 1.0, 0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    "field, value", [("epochs", 0), ("lr", -1.0), ("lr", math.nan), ("schedule", "linear")]
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).check()


class _Planted:
    """What a hostile checkpoint would hold: unpickling it runs code."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def _two_epochs(tmp_path, identity=None, resume=False):
    """Epoch 1 of 2 into ``tmp_path`` (or, with ``resume``, the rest from its checkpoint)."""
    model, batches, loss_fn = _setup()
    return fit(
        model,
        batches,
        loss_fn,
        TrainConfig(epochs=2, lr=1e-2, seed=1),
        device=torch.device("cpu"),
        out_dir=tmp_path,
        verbose=False,
        stop_after_epochs=None if resume else 1,
        resume=resume,
        identity=identity,
    )


def _train_two_epochs(tmp_path, identity=None):
    return _two_epochs(tmp_path, identity)


def _resume(tmp_path, identity=None):
    return _two_epochs(tmp_path, identity, resume=True)


def test_a_planted_checkpoint_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _Planted()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a beyond-icon checkpoint that can be loaded safely"):
        _resume(tmp_path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "content", [b"", b"garbage", None], ids=["empty", "garbage", "foreign-dict"]
)
def test_foreign_or_broken_checkpoints_are_one_line_errors(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"model": {}, "epoch": 1}, path)  # a plain dict from another program
        message = "not written by this version of beyond-icon"
    else:
        path.write_bytes(content)
        message = "not a beyond-icon checkpoint"
    with pytest.raises(ValueError, match=message) as info:
        _resume(tmp_path)
    assert "\n" not in str(info.value)


def test_fused_adam_is_the_same_update(monkeypatch):
    """TrainConfig(fused=True) takes Adam's fused kernel on the CPU; its step equals the default
    (for-each) Adam's to rounding (one step: later ones amplify rounding where Adam divides a
    near-zero gradient by its own scale)."""
    built = []
    real = torch.optim.Adam.__init__

    def spy(self, params, **kwargs):
        built.append(kwargs.get("fused"))
        real(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", spy)
    weights = []
    for fused in (False, True):
        model, batches, loss_fn = _setup()
        config = TrainConfig(epochs=1, lr=1e-2, seed=5, fused=fused)
        one = lambda generator, batches=batches: batches(generator)[:1]  # noqa: E731
        fit(model, one, loss_fn, config, device=torch.device("cpu"), verbose=False)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert built == [None, True]
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings_and_names_them(tmp_path, capsys):
    _train_two_epochs(tmp_path, identity={"divergence": "kl", "lr": 0.01, "n_steps": 10})
    with pytest.raises(ValueError, match=r"divergence: 'kl' there, 'tv' now"):
        _resume(tmp_path, identity={"divergence": "tv", "lr": 0.01, "n_steps": 10})
    history = _resume(tmp_path, identity={"divergence": "kl", "lr": 0.01, "n_steps": 20})
    assert history[-1]["segment"] == 1 and history[0]["segment"] == 0


@pytest.mark.parametrize(
    "key, before, default",
    [
        ("q_scope", "global", "auto"),
        ("neighbor_mix", 0.0, 0.75),
        ("n_cells", 0, None),
        ("hidden", [256, 256], [128, 128]),
        ("recipe", 1, RECIPE),  # the current recipe of parametric SNE
    ],
)
def test_resume_a_checkpoint_from_before_a_setting_existed(tmp_path, key, before, default):
    """A checkpoint whose identity lacks a setting added later ran with that setting's old
    behaviour (q over the train split; p on the pair-mate only): it resumes under that value and
    refuses the new default."""
    _train_two_epochs(tmp_path, identity={"divergence": "kl", "n_steps": 10})
    with pytest.raises(ValueError, match=re.escape(f"{key}: {before!r} there, {default!r} now")):
        _resume(tmp_path, identity={"divergence": "kl", "n_steps": 10, key: default})
    history = _resume(tmp_path, identity={"divergence": "kl", "n_steps": 20, key: before})
    assert history[-1]["segment"] == 1


def test_finite_loss_with_non_finite_gradient_stops_with_the_step(tmp_path):
    from beyond_icon.train import TrainingDiverged

    model = torch.nn.Linear(3, 1)

    def loss_fn(_):
        return torch.sqrt((model.weight * 0).sum()) + 1.0  # value 1, gradient nan (sqrt at 0)

    with pytest.raises(TrainingDiverged, match=r"training diverged at step 0 \(epoch 1\)"):
        fit(
            model,
            lambda g: [0, 1],
            loss_fn,
            TrainConfig(epochs=1),
            device=torch.device("cpu"),
            verbose=False,
        )
    assert torch.isfinite(model.weight).all()  # the step was not taken


def test_the_clock_carries_over_resumed_segments(tmp_path):
    """train_time_s of a resumed run counts every segment, not only the last."""
    first = _train_two_epochs(tmp_path)
    resumed = _resume(tmp_path)
    assert resumed[len(first) - 1]["time"] == first[-1]["time"]
    assert resumed[-1]["time"] >= first[-1]["time"] and resumed[-1]["segment"] == 1


def test_a_step_without_value_checks_still_names_a_bad_input():
    """The loop runs the loss without value checks (no host syncs); a NaN feature then gives a
    NaN loss, and the loop reruns the step with the checks on to name the rows."""
    from beyond_icon import methods
    from beyond_icon.train import TrainingDiverged

    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    x[5] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    supcon = methods.SupCon(divergence="tv")
    with pytest.raises(TrainingDiverged, match=r"step 0 .*z contains NaN or Inf in row\(s\) \[5\]"):
        fit(
            model,
            lambda g: [0],
            lambda _: supcon(model(x), labels),
            TrainConfig(epochs=1),
            device=torch.device("cpu"),
            verbose=False,
        )
    assert torch.isfinite(model.weight).all()


def test_a_chunked_loss_trains_through_the_loop():
    """The loop's forward runs without value checks and its backward outside that block: the
    checkpointed chunks must recompute the branch their forward took."""
    from beyond_icon import methods

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(16, 4)
    labels = torch.arange(16) % 4
    supcon = methods.SupCon(divergence="jsd", chunk_size=4)
    history = fit(
        model,
        lambda g: [0, 1],
        lambda _: supcon(model(x), labels),
        TrainConfig(epochs=2),
        device=torch.device("cpu"),
        verbose=False,
    )
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)


def test_numpy_scalars_in_a_runs_identity_are_its_python_numbers():
    """A run's identity holds numpy scalars as Python numbers: np.int64(10) and 10 are one
    setting on resume, and the checkpoint stays loadable with weights_only."""
    from beyond_icon.train import _plain

    plain = _plain({"perplexity": np.int64(10), "lr": np.float32(0.5), "x": [np.float64(2.0)]})
    assert plain == {"perplexity": 10, "lr": 0.5, "x": [2.0]}
    assert type(plain["perplexity"]) is int and type(plain["x"][0]) is float


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"weight_decay": -1.0}, "weight_decay must be a number >= 0, got -1.0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a number >= 0"),
        (
            {"epochs": 1, "warmup_epochs": 5},
            r"warmup_epochs must be an integer in \[0, epochs = 1\)",
        ),
    ],
)
def test_optimiser_settings_are_checked(settings, message):
    from beyond_icon.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).check()


@pytest.mark.parametrize("clip", [-1.0, 0.0, float("nan")])
def test_grad_clip_must_be_positive(clip):
    """A negative max norm flips the gradients (training uphill); 0 used to mean no clipping."""
    with pytest.raises(ValueError, match="grad_clip must be a positive number or None"):
        TrainConfig(grad_clip=clip).check()


def _fit_small(out, **kwargs):
    """One epoch of the small model into ``out`` (on the CPU)."""
    model, batches, loss_fn = _setup()
    settings = {"resume": False, "verbose": False} | kwargs
    fit(
        model,
        batches,
        loss_fn,
        TrainConfig(epochs=1, lr=1e-2),
        device=torch.device("cpu"),
        out_dir=out,
        **settings,
    )


def test_a_new_run_removes_the_earlier_runs_checkpoint_and_metrics(tmp_path, capsys):
    _fit_small(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")  # what a task writes last
    # a new run stopped before its first save: nothing of the earlier run is left beside it
    _fit_small(tmp_path, verbose=True, stop_after_epochs=0)
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "checkpoint.pt").exists()
    assert "the earlier run's checkpoint and metrics.json were removed" in capsys.readouterr().out


def test_resume_without_a_checkpoint_says_it_starts_from_the_beginning(tmp_path, capsys):
    _fit_small(tmp_path / "typo", resume=True, verbose=True)
    assert "no checkpoint in" in capsys.readouterr().out


def test_a_checkpoint_keeps_the_cuda_generator_slot_and_a_short_reason(tmp_path):
    _fit_small(tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "cuda_rng" in state and state["cuda_rng"] is None  # a CPU run; a CUDA one saves it
    assert state["torch_rng"].device.type == "cpu"
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[:1000])  # cut: torch's zip error is long
    with pytest.raises(ValueError) as info:
        _resume(tmp_path)
    assert "If you are seeing this error" not in str(info.value), str(info.value)
    assert str(info.value).endswith("delete it or run without --resume")


def test_a_resume_without_a_checkpoint_is_said_even_when_quiet(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint in .*starts from the beginning"):
        history = _resume(tmp_path / "empty")
    assert sorted({h["epoch"] for h in history}) == [0, 1]  # both epochs, from the start


def test_a_cuda_device_is_named_as_requested(monkeypatch):
    from beyond_icon.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:5' was requested but no CUDA GPU"):
        resolve_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:5' .* has 2 CUDA GPU\(s\): cuda:0 to cuda:1"):
        resolve_device("cuda:5")
