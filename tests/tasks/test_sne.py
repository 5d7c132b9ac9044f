"""The sne command on tiny data (the estimator: tests/test_parametric_sne.py)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import run_task

from beyond_icon import data
from beyond_icon.cli import main


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").subset(300, 100)


def test_cli_writes_every_file(tmp_path):
    out = tmp_path / "run"
    metrics = run_task(
        [
            "sne",
            "--data",
            "digits",
            "--n-train",
            "200",
            "--n-test",
            "80",
            "--n-steps",
            "4",
            "--batch-size",
            "100",
            "--perplexity",
            "10",
            "--divergence",
            "hellinger",
            "--kernel",
            "student_t",
        ],
        out,
        ("embedding.png", "grad_norm.png", "embedding.npz"),
    )
    assert {
        "knn_acc",
        "trustworthiness",
        "silhouette",
        "train_time_s",
        "transform_time_s",
        "knn_acc_10",
        "n_steps",
    } <= set(metrics)
    assert 0 <= metrics["knn_acc"] <= 1 and 0 <= metrics["trustworthiness"] <= 1
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[0]["grad_norm"]) > 0 and metrics["n_steps"] == 4
    emb = np.load(out / "embedding.npz")
    assert emb["test"].shape == (80, 2)
    assert "divergence: hellinger" in (out / "config.yaml").read_text()


def test_cli_config_file_and_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("task: sne\ndata: simplex:4\nn_steps: 2\nbatch_size: 120\nperplexity: 5\n")
    assert main(["sne", "--config", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "data: simplex:4" in (tmp_path / "r" / "config.yaml").read_text()
    config.write_text("task: sne\nbogus: 1\n")
    assert main(["sne", "--config", str(config), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "unknown sne option(s): bogus" in capsys.readouterr().err
    assert main(["sne", "--data", "nope", "--out", str(tmp_path / "r3"), "--quiet"]) == 2
    config.write_text("task: sne\nepochs: 50\n")  # an option of the previous recipe
    assert main(["sne", "--config", str(config), "--out", str(tmp_path / "r4"), "--quiet"]) == 2
    assert "no option 'epochs' any more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sne", "--epochs", "50", "--out", str(tmp_path / "r5"), "--quiet"])
    assert "--n-steps" in capsys.readouterr().err


def test_a_refused_resume_leaves_the_runs_config(tmp_path, capsys):
    """A --resume with other settings is refused before any step and keeps config.yaml as the
    run's record; a resume that extends the run rewrites it when the run finishes."""
    out = str(tmp_path / "run")
    base = ["sne", "--data", "digits", "--n-train", "200", "--n-test", "80", "--device", "cpu"]
    fast = ["--batch-size", "100", "--perplexity", "10", "--out", out, "--quiet"]
    assert main([*base, *fast, "--n-steps", "4"]) == 0
    assert main([*base, *fast, "--n-steps", "4", "--seed", "1", "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "seed: 0" in config and "n_steps: 4" in config
    assert main([*base, *fast, "--n-steps", "6", "--resume"]) == 0
    assert "n_steps: 6" in (tmp_path / "run" / "config.yaml").read_text()
    assert main([*base, *fast, "--n-steps", "2", "--resume"]) == 2  # a resume cannot cut a run
    assert "holds 3 epochs (6 steps), more than the 1 this run asks for" in capsys.readouterr().err
    assert "n_steps: 6" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--knn-k", "0"], "knn_k must be a non-empty list of positive integers"),
        (["--knn-k", "200"], "knn_k must be below the 200 training points, got 200"),
        (["--n-test", "3"], "the test split needs at least 4 points"),
        (["--n-test", "10"], "got 10 points of 10 classes; raise --n-test"),
        (["--knn-k", ""], "expected a comma-separated list of int, got ''"),
        (["--hidden", "a"], "expected a comma-separated list of int, got 'a'"),
        (["--n-cells", "x"], "invalid int value: 'x'"),
        (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_evaluation_and_option_errors_come_before_training(tmp_path, capsys, args, message):
    argv = ["sne", "--data", "digits", "--n-train", "200", "--n-test", "80", "--n-steps", "4"]
    try:
        code = main([*argv, *args, "--out", str(tmp_path / "run"), "--quiet"])
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before any step


def test_a_run_refused_before_training_takes_the_corrected_settings_on_resume(tmp_path):
    """A run stopped by a bad option writes nothing in its folder: resumed with the corrected
    options (no checkpoint) it writes their config.yaml (a sweep compares runs by it)."""
    out = str(tmp_path / "run")
    argv = ["sne", "--data", "digits", "--n-train", "200", "--n-test", "80", "--n-steps", "4"]
    fast = ["--batch-size", "100", "--device", "cpu", "--out", out, "--quiet"]
    assert main([*argv, *fast, "--perplexity", "10", "--knn-k", "500"]) == 2
    assert not (tmp_path / "run" / "config.yaml").exists()
    with pytest.warns(UserWarning, match="no checkpoint in .*starts from the beginning"):
        assert main([*argv, *fast, "--perplexity", "12", "--resume"]) == 0
    assert "perplexity: 12.0" in (tmp_path / "run" / "config.yaml").read_text()
