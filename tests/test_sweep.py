"""Sweeps: run counts, aggregation consistency, resumption after a kill, report, user divergences."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from beyond_icon import divergences, sweep
from beyond_icon.cli import main
from beyond_icon.parametric_sne import ParametricSNE

TINY = [
    "--data",
    "digits",
    "--n-train",
    "240",
    "--n-test",
    "80",
    "--n-steps",
    "6",
    "--batch-size",
    "80",
    "--perplexity",
    "8",
    "--device",
    "cpu",
    "--quiet",
]


def _sweep(out, divergences="kl,tv", seeds="0,1", extra=()):
    return main(
        [
            "sweep",
            "sne",
            "--divergences",
            divergences,
            "--seeds",
            seeds,
            *TINY,
            *extra,
            "--out",
            str(out),
        ]
    )


def test_sweep_runs_and_tables_agree_with_runs(tmp_path):
    out = tmp_path / "s"
    assert _sweep(out) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["kl_s0", "kl_s1", "tv_s0", "tv_s1"]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        metrics = json.loads((out / "runs" / row["run"] / "metrics.json").read_text())
        assert float(row["knn_acc"]) == pytest.approx(metrics["knn_acc"])
    table = (out / "results.md").read_text()
    for name in ("kl", "tv"):
        values = [
            json.loads((out / "runs" / f"{name}_s{s}" / "metrics.json").read_text())["knn_acc"]
            for s in (0, 1)
        ]
        cell = f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
        assert cell in table, (cell, table)
    assert table.count("**") >= 2  # best per column marked
    for figure in ("sne_bars.png", "sne_embeddings.png", "sne_grad_norm.png"):
        assert (out / figure).is_file()


def test_report_rebuilds_identical_tables(tmp_path):
    out = tmp_path / "s"
    assert _sweep(out, divergences="jsd", seeds="0,1") == 0
    first = (out / "results.md").read_text()
    csv_first = (out / "results.csv").read_text()
    (out / "results.md").unlink()
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "results.md").read_text() == first
    assert (out / "results.csv").read_text() == csv_first


def test_killed_sweep_finishes_without_redoing_runs(tmp_path):
    out = tmp_path / "s"
    command = [
        sys.executable,
        "-m",
        "beyond_icon",
        "sweep",
        "sne",
        "--divergences",
        "kl,tv",
        "--seeds",
        "0,1",
        *TINY,
        "--n-steps",
        "30",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    first = out / "runs" / "kl_s0" / "metrics.json"
    while not first.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert first.is_file()
    finished_before = {
        p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")
    }
    assert len(finished_before) < 4
    assert main(command[3:]) == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    assert len(after) == 4
    for name, stamp in finished_before.items():
        assert after[name] == stamp  # not recomputed


def test_sweep_rejects_other_options_in_same_folder(tmp_path, capsys):
    out = tmp_path / "s"
    assert _sweep(out, divergences="kl", seeds="0") == 0
    assert _sweep(out, divergences="kl", seeds="0", extra=("--kernel", "gaussian")) == 2
    err = capsys.readouterr().err
    assert "other settings (kernel: 'student_t' there, 'gaussian' now, in kl_s0)" in err


def _written_before(spec, key: str) -> None:
    """Rewrite a finished run's config.yaml as a version before ``key`` existed wrote it."""
    import yaml

    config = Path(spec.folder) / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    del saved[key]
    config.write_text(yaml.safe_dump(saved, sort_keys=False))


def test_sweep_compares_settings_resolved_not_as_passed(tmp_path, capsys):
    """A run made before a default changed (its config.yaml has no neighbor_mix: the
    pair-only p) is not mixed with runs of the new default, although the options passed are the
    same; passing the old value continues the sweep, and spelling out a default is no change."""

    options = {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0}
    specs = sweep.plan("cluster", ["tv"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    _written_before(specs[0], "neighbor_mix")
    with pytest.raises(ValueError, match=r"neighbor_mix: 0.0 there, 0.75 now, in tv_s0"):
        sweep.plan("cluster", ["kl"], [0], options, tmp_path / "s")
    assert sweep.plan("cluster", ["kl"], [0], options | {"neighbor_mix": 0.0}, tmp_path / "s")
    fresh = sweep.plan("cluster", ["tv"], [0], options, tmp_path / "t")
    assert sweep.run_sweep(fresh, verbose=False) == []
    assert sweep.plan("cluster", ["kl"], [1], options | {"neighbor_mix": 0.75}, tmp_path / "t")


def test_an_sne_run_made_before_the_cells_is_not_taken_for_the_new_default(tmp_path):
    """n_cells came with a new default (the cells); a run whose config.yaml lacks it trained the
    plain MLP (n_cells 0), so the default's sweep refuses it and --n-cells 0 continues it."""

    options = {"data": "simplex:3", "n_steps": 2}
    specs = sweep.plan("sne", ["kl"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    _written_before(specs[0], "n_cells")
    with pytest.raises(sweep.SettingsChanged, match=r"n_cells: 0 there, None now, in kl_s0"):
        sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    assert sweep.plan("sne", ["tv"], [0], options | {"n_cells": 0}, tmp_path / "s")


def test_an_sne_run_of_the_batch_q_default_is_not_taken_for_auto(tmp_path):
    """q_scope's default became auto (KL's q for the train split); a run written under the
    previous default records q_scope: batch, so the default's sweep refuses it, whatever the
    divergence, and --q-scope batch continues it."""
    import yaml

    options = {"data": "simplex:3", "n_steps": 2}
    specs = sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    config = Path(specs[0].folder) / "config.yaml"
    written = yaml.safe_load(config.read_text())
    assert written["q_scope"] == "auto"
    config.write_text(yaml.safe_dump(written | {"q_scope": "batch"}, sort_keys=False))
    with pytest.raises(sweep.SettingsChanged, match=r"q_scope: 'batch' there, 'auto' now"):
        sweep.plan("sne", ["kl"], [0], options, tmp_path / "s")
    assert sweep.plan("sne", ["kl"], [0], options | {"q_scope": "batch"}, tmp_path / "s")


def test_an_sne_run_of_an_earlier_recipe_is_not_taken_for_the_new_default(tmp_path):
    """recipe and hidden came with the 128-128 MLP and the other changes of recipe 2; a run
    whose config.yaml lacks them was made by recipe 1 (256-256), which no option reproduces,
    and a run of recipe 4 (the exact cell lookup) is not one of recipe 5 either: the sweep refuses
    them whatever is passed (the demo then sets its folder aside). A run made before
    input_noise_power existed had the same noise on every feature: refused by the new default,
    continued with input_noise_power=0; one made before local_dims, likewise with local_dims=0.
    A run's config.yaml, recipe included, still loads as
    --config."""
    import yaml

    from beyond_icon.tasks.common import config_from_dict
    from beyond_icon.tasks.sne import SNEConfig

    options = {"data": "simplex:3", "n_steps": 2}
    specs = sweep.plan("sne", ["kl"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    written = yaml.safe_load((Path(specs[0].folder) / "config.yaml").read_text())
    assert written["recipe"] == SNEConfig.recipe == 5
    assert written["input_noise_power"] == SNEConfig().estimator().input_noise_power == 0.5
    assert config_from_dict(SNEConfig, written).hidden == [128, 128]
    config = Path(specs[0].folder) / "config.yaml"
    before = {k: v for k, v in written.items() if k != "input_noise_power"}
    config.write_text(yaml.safe_dump(before, sort_keys=False))
    with pytest.raises(
        sweep.SettingsChanged, match="input_noise_power: 0.0 there, 0.5 now"
    ) as error:
        sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    assert error.value.keys == ["input_noise_power"] and "earlier recipe" not in str(error.value)
    assert sweep.plan("sne", ["tv"], [0], options | {"input_noise_power": 0.0}, tmp_path / "s")
    # made before the cells' own maps: refused by the new default, continued with local_dims=0
    assert written["local_dims"] == 5
    before = {k: v for k, v in written.items() if k != "local_dims"}
    config.write_text(yaml.safe_dump(before, sort_keys=False))
    with pytest.raises(sweep.SettingsChanged, match="local_dims: 0 there, 5 now") as error:
        sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    assert error.value.keys == ["local_dims"]
    assert sweep.plan("sne", ["tv"], [0], options | {"local_dims": 0}, tmp_path / "s")
    # recipe 4 (the exact cell lookup)
    config.write_text(yaml.safe_dump(written | {"recipe": 4}, sort_keys=False))
    with pytest.raises(sweep.SettingsChanged, match="recipe: 4 there, 5 now") as error:
        sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    assert error.value.keys == ["recipe"] and "an earlier recipe" in str(error.value)
    _written_before(specs[0], "hidden")
    _written_before(specs[0], "recipe")
    with pytest.raises(sweep.SettingsChanged, match="an earlier recipe") as error:
        sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    message = str(error.value)
    assert "hidden: [256, 256] there, [128, 128] now" in message
    assert "recipe: 1 there, 5 now" in message and set(error.value.keys) == {"hidden", "recipe"}
    with pytest.raises(sweep.SettingsChanged, match="recipe: 1 there, 5 now") as error:
        sweep.plan("sne", ["tv"], [0], options | {"hidden": [256, 256]}, tmp_path / "s")
    assert error.value.keys == ["recipe"]


def _tiny_cluster_sweep(out, divergences=("tv",), **extra):
    options = {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0} | extra
    specs = sweep.plan("cluster", list(divergences), [0], options, out)
    assert sweep.run_sweep(specs, verbose=False) == []
    return options, specs


def test_sweep_fills_a_key_an_old_run_lacks_with_its_default(tmp_path):
    """A setting added after a run was made (not in LEGACY_SETTINGS) had its default's
    behaviour there: another value now is a different method, the default is not."""

    options, specs = _tiny_cluster_sweep(tmp_path / "s")
    _written_before(specs[0], "optimizer")
    before = (tmp_path / "s" / "sweep.yaml").read_text()
    with pytest.raises(ValueError, match=r"optimizer: 'adam' there, 'adamw' now, in tv_s0"):
        sweep.plan("cluster", ["kl"], [0], options | {"optimizer": "adamw"}, tmp_path / "s")
    assert (tmp_path / "s" / "sweep.yaml").read_text() == before  # a refused plan writes nothing
    assert sweep.plan("cluster", ["kl"], [0], options, tmp_path / "s")


def test_sweep_settings_that_do_not_define_a_run_may_change(tmp_path):
    options, _ = _tiny_cluster_sweep(tmp_path / "s", divergences=("tv", "pmi"))
    # evaluation-only (k-means restarts), where it runs, where the data sit
    changed = options | {"kmeans_init": 3, "device": "cpu", "data_dir": str(tmp_path)}
    assert sweep.plan("cluster", ["kl", "pmi"], [0, 1], changed, tmp_path / "s")
    recorded = yaml_load(tmp_path / "s" / "sweep.yaml")
    assert recorded["options"] == options  # the first call's, as passed
    assert recorded["divergences"] == ["tv", "pmi", "kl"]


def test_sweep_compares_the_loss_except_for_the_pmi_baseline(tmp_path):
    """Runs trained with loss=pmi under a divergence's name are not the I-Con runs."""
    options, _ = _tiny_cluster_sweep(tmp_path / "s", loss="pmi")
    with pytest.raises(ValueError, match=r"loss: 'pmi' there, 'icon' now, in tv_s0"):
        sweep.plan(
            "cluster",
            ["kl"],
            [0],
            {k: v for k, v in options.items() if k != "loss"},
            tmp_path / "s",
        )


def test_sweep_ignores_a_run_that_stopped_before_training(tmp_path):
    """A run refused by its own checks (its folder untouched, nothing trained) does not block
    the corrected sweep."""
    options = {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0, "n_neighbors": 100000}
    specs = sweep.plan("cluster", ["tv"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == specs  # failed: n_neighbors too large
    assert not (Path(specs[0].folder) / "config.yaml").exists()  # refused before the folder
    options.pop("n_neighbors")
    again = sweep.plan("cluster", ["tv"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(again, verbose=False) == []
    # no run had trained with the refused options: sweep.yaml records the corrected ones
    assert yaml_load(tmp_path / "s" / "sweep.yaml")["options"] == options


def test_divergences_that_differ_only_in_case_are_one(tmp_path):
    with pytest.raises(ValueError, match="must not repeat"):
        sweep.plan("cluster", ["kl", "KL"], [0], {"data": "simplex:3"}, tmp_path / "s")
    # across calls too: one name, one run folder, one table row
    sweep.plan("cluster", ["kl"], [0], {"data": "simplex:3"}, tmp_path / "t")
    specs = sweep.plan("cluster", [" KL"], [0], {"data": "simplex:3"}, tmp_path / "t")
    assert [Path(s.folder).name for s in specs] == ["kl_s0"]
    assert yaml_load(tmp_path / "t" / "sweep.yaml")["divergences"] == ["kl"]


@pytest.mark.parametrize(
    "text, what",
    [
        ("", "is empty"),
        ("task: cluster\n", "lacks divergences, seeds"),
        ("- a list\n", "is not a mapping"),
        ("task: [cluster\n", "is not valid YAML"),
    ],
)
def test_a_damaged_sweep_yaml_is_named(tmp_path, capsys, text, what):
    _tiny_cluster_sweep(tmp_path / "s")
    (tmp_path / "s" / "sweep.yaml").write_text(text)
    for command in (["report", str(tmp_path / "s")], _cluster_cli(tmp_path / "s")):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert f"sweep.yaml {what}" in err and "delete it and rerun" in err, err
        assert len(err.splitlines()) == 1


def _cluster_cli(out, divergences="tv", seeds="0", *extra):
    return [
        "sweep",
        "cluster",
        "--data",
        "simplex:3",
        "--n-steps",
        "2",
        "--kmeans-init",
        "0",
        "--divergences",
        divergences,
        "--seeds",
        seeds,
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def test_sweep_yaml_is_replaced_whole(tmp_path, monkeypatch):
    """Written to a temporary file and renamed: a write stopped before the rename leaves the
    earlier sweep.yaml whole (written in place, it would hold the new record or half of it)."""
    _tiny_cluster_sweep(tmp_path / "s")
    before = (tmp_path / "s" / "sweep.yaml").read_text()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.plan(
            "cluster",
            ["kl"],
            [0, 1],
            {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0},
            tmp_path / "s",
        )
    assert (tmp_path / "s" / "sweep.yaml").read_text() == before


def test_one_run_has_no_std_and_a_nan_is_never_best(tmp_path):
    _tiny_cluster_sweep(tmp_path / "s", divergences=("tv", "kl"))
    table = sweep.build_report(tmp_path / "s", verbose=False)
    assert "± 0.000" not in table and "± –" in table, table  # one seed: std undefined
    metrics = tmp_path / "s" / "runs" / "kl_s0" / "metrics.json"
    values = json.loads(metrics.read_text())
    values["acc"] = float("nan")
    metrics.write_text(json.dumps(values))  # json writes NaN, and reads it back
    rows = {
        line.split("|")[1].strip(): line
        for line in sweep.build_report(tmp_path / "s", verbose=False).splitlines()
    }
    assert "nan ± –" in rows["kl"] and "**nan" not in rows["kl"], rows["kl"]


def test_a_metric_some_runs_lack_has_its_own_n(tmp_path):
    _tiny_cluster_sweep(tmp_path / "s", divergences=("tv",))
    specs = sweep.plan(
        "cluster",
        ["tv"],
        [1],
        {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0},
        tmp_path / "s",
    )
    assert sweep.run_sweep(specs, verbose=False) == []
    metrics = tmp_path / "s" / "runs" / "tv_s0" / "metrics.json"
    values = json.loads(metrics.read_text())
    nmi = json.loads((tmp_path / "s" / "runs" / "tv_s1" / "metrics.json").read_text())["nmi"]
    del values["nmi"]  # a run of a version without it
    metrics.write_text(json.dumps(values))
    table = sweep.build_report(tmp_path / "s", verbose=False)
    row = next(line for line in table.splitlines() if line.startswith("| tv |"))
    assert row.startswith("| tv | 2 |"), row
    assert f"{nmi:.3f} ± – (n = 1)" in row.replace("**", ""), row


@pytest.mark.parametrize(
    "text, what", [('{"acc": 0.5', "is not valid JSON"), ("[1, 2]", "holds a list, not metrics")]
)
def test_a_damaged_metrics_json_is_named(tmp_path, capsys, text, what):
    _tiny_cluster_sweep(tmp_path / "s")
    path = tmp_path / "s" / "runs" / "tv_s0" / "metrics.json"
    path.write_text(text)
    assert main(["report", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{path} {what}" in err and "delete" in err and "rerun the sweep" in err, err


def test_sweep_options_of_the_command_line_are_checked(tmp_path, capsys):
    for extra, message in (
        (("--seeds", "a"), "argument --seeds: expected a comma-separated list of int, got 'a'"),
        (("--jobs", "0"), "argument --jobs: expected a positive integer, got '0'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(_cluster_cli(tmp_path / "s") + list(extra))
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_a_sweep_whose_runs_all_fail_says_so(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_cluster_cli(out, "tv,kl", "0", "--n-neighbors", "100000")) == 2
    err = capsys.readouterr().err
    assert "run tv_s0 failed: n_neighbors must be in" in err
    assert "all 2 run(s) failed (the reasons above); fix the options and rerun" in err, err
    assert "no finished run" not in err
    assert main(_cluster_cli(out, "tv,kl", "0")) == 0
    # no run trained with the refused value: sweep.yaml takes the corrected options
    assert yaml_load(out / "sweep.yaml")["options"]["n_neighbors"] != 100000


def test_an_interrupted_sweep_says_to_rerun_the_same_command(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main(_cluster_cli(tmp_path / "s")) == 130
    err = capsys.readouterr().err
    assert "rerun the same command" in err and "--resume" not in err, err


def test_a_data_path_given_relative_or_absolute_is_the_same_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32) + np.repeat(np.eye(5)[:3] * 4, 20, 0)
    for name in ("emb.npz", "other.npz"):
        np.savez(tmp_path / name, x=x, y=np.repeat(np.arange(3), 20))
    monkeypatch.chdir(tmp_path)
    options = {"data": "embeddings:emb.npz", "n_steps": 2, "kmeans_init": 0, "n_neighbors": 3}
    specs = sweep.plan("cluster", ["tv"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    absolute = options | {"data": f"embeddings:{tmp_path / 'emb.npz'}"}
    assert sweep.plan("cluster", ["kl"], [0], absolute, tmp_path / "s")
    with pytest.raises(sweep.SettingsChanged, match="data: 'embeddings:emb.npz' there"):
        sweep.plan(
            "cluster", ["kl"], [0], options | {"data": "embeddings:other.npz"}, tmp_path / "s"
        )


def yaml_load(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_unknown_divergence_fails_before_training(tmp_path, capsys):
    assert _sweep(tmp_path / "s", divergences="kl,nope") == 2
    assert "unknown divergence 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()


USER_DIVERGENCES = """
import torch

def squared_hellinger_twice(log_p, log_q):
    return ((0.5 * log_p).exp() - (0.5 * log_q).exp()).pow(2).sum(-1)

def triangular(t):
    return (t - 1) ** 2 / (t + 1)
"""


@pytest.mark.parametrize("name", ["squared_hellinger_twice", "triangular"])
def test_user_defined_divergence_module(tmp_path, name):
    (tmp_path / "mine.py").write_text(USER_DIVERGENCES)
    out = tmp_path / name
    code = main(
        [
            "sne",
            *TINY,
            "--divergence-module",
            f"{tmp_path / 'mine.py'}:{name}",
            "--divergence",
            name,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["knn_acc"] > 0
    assert name in divergences.names()
    # and through a parallel sweep, where each worker process registers it again
    code = main(
        [
            "sweep",
            "sne",
            "--divergences",
            f"kl,{name}",
            "--seeds",
            "0",
            *TINY,
            "--jobs",
            "2",
            "--divergence-module",
            f"{tmp_path / 'mine.py'}:{name}",
            "--out",
            str(tmp_path / f"sw_{name}"),
        ]
    )
    assert code == 0
    assert len(list((tmp_path / f"sw_{name}" / "runs").glob("*/metrics.json"))) == 2


SELF_REGISTERING = """
import beyond_icon as bi

triangular_reg = bi.divergences.f_divergence(lambda t: (t - 1) ** 2 / (t + 1), slope_at_infinity=1.0)
bi.divergences.register("triangular_reg", triangular_reg)
"""


def test_a_divergence_file_that_registers_itself_runs_in_a_sweep(tmp_path):
    """The guide's file calls register() itself; a sweep loads it when planning and for each
    run in this process: the file runs once, so the name is not found taken."""
    (tmp_path / "mine_reg.py").write_text(SELF_REGISTERING)
    try:
        out = tmp_path / "s"
        assert (
            main(
                _cluster_cli(
                    out,
                    "kl,triangular_reg",
                    "0",
                    "--divergence-module",
                    f"{tmp_path / 'mine_reg.py'}:triangular_reg",
                )
            )
            == 0
        )
        assert len(list((out / "runs").glob("*/metrics.json"))) == 2
    finally:
        divergences._REGISTRY.pop("triangular_reg", None)


def test_cluster_sweep_has_pmi_and_kmeans_rows(tmp_path):
    out = tmp_path / "c"
    code = main(
        [
            "sweep",
            "cluster",
            "--divergences",
            "tv",
            "--baselines",
            "pmi",
            "--seeds",
            "0",
            "--data",
            "digits",
            "--n-train",
            "300",
            "--n-test",
            "100",
            "--n-steps",
            "1",
            "--kmeans-init",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = (out / "results.md").read_text()
    assert "| pmi |" in table and "| k-means |" in table
    task, rows, summary = sweep.aggregate(out)
    assert task == "cluster" and {r["divergence"] for r in rows} == {"tv", "pmi"}


def test_a_run_held_by_another_sweep_is_skipped_not_redone(tmp_path):
    """Two sweeps over one folder: a run locked by the other is skipped (not failed, not run
    twice into the same checkpoint); once the lock is gone, the sweep does it."""
    sweep_module = sweep
    specs = sweep_module.plan(
        "cluster",
        ["tv"],
        [0, 1],
        {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0},
        tmp_path / "s",
    )
    busy = Path(specs[0].folder)
    with sweep_module.run_lock(busy):  # what the other sweep holds while it trains
        with pytest.raises(sweep_module.RunBusy, match="being run by another process"):
            sweep_module._execute(specs[0], None)
        failed = sweep_module.run_sweep(specs, verbose=False)
        assert failed == [] and not specs[0].finished and specs[1].finished
    assert sweep_module.run_sweep(specs, verbose=False) == [] and specs[0].finished


def test_metrics_json_is_written_after_every_other_artefact(tmp_path):
    from beyond_icon.tasks import cluster

    out = tmp_path / "r"
    cluster.run(
        cluster.ClusterConfig(data="simplex:3", n_steps=2, kmeans_init=0), out=out, verbose=False
    )
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert stamps["metrics.json"] == max(stamps.values()), stamps


def test_pmi_is_a_baseline_not_a_divergence(tmp_path, capsys):
    args = ["sweep", "cluster", "--seeds", "0", "--data", "simplex:3", "--out", str(tmp_path)]
    assert main([*args, "--divergences", "tv,pmi"]) == 2
    assert "--baselines pmi" in capsys.readouterr().err
    assert main([*args, "--divergences", "tv", "--baselines", "kmeans"]) == 2
    assert "unknown cluster baseline(s) ['kmeans']; known: pmi" in capsys.readouterr().err


def test_sne_runs_continue_on_another_device(tmp_path):
    """The default backbone (auto) is the MLP on every device, so a sweep begun on the CPU is
    continued on a GPU; so is one with the backbone named."""
    options = {"data": "digits", "n_train": 240, "n_test": 80, "n_steps": 6, "device": "cpu"}
    assert ParametricSNE().backbone == "auto"
    specs = sweep.plan("sne", ["tv"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    assert sweep.plan("sne", ["kl"], [0], options | {"device": "cuda"}, tmp_path / "s")
    named = options | {"backbone": "mlp"}
    specs = sweep.plan("sne", ["tv"], [0], named, tmp_path / "t")
    assert sweep.run_sweep(specs, verbose=False) == []
    assert sweep.plan("sne", ["kl"], [0], named | {"device": "cuda"}, tmp_path / "t")
    # where p's table is cached and the evaluation's k values do not define a run either
    other = named | {"cache_dir": str(tmp_path / "cache"), "knn_k": [5]}
    assert sweep.plan("sne", ["kl"], [0], other, tmp_path / "t")


@pytest.mark.parametrize("name", ["history.csv", "embedding.npz"])
def test_damaged_sne_run_files_are_named(tmp_path, capsys, name):
    out = tmp_path / "s"
    assert _sweep(out, divergences="kl", seeds="0") == 0
    path = out / "runs" / "kl_s0" / name
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])  # cut mid-write
    assert main(["report", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path} is damaged" in err and "rerun the sweep to redo that run" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_cluster_run_scored_on_the_75_percent_split_is_not_mixed_with_whole_data_runs(tmp_path):
    """Cluster recipe 2 clusters data without a test split whole; a run written before it
    (no recipe in its config.yaml: recipe 1, its 75% train split) is refused by name."""
    options = {"data": "simplex:3", "n_steps": 2, "kmeans_init": 0}
    specs = sweep.plan("cluster", ["kl"], [0], options, tmp_path / "s")
    assert sweep.run_sweep(specs, verbose=False) == []
    _written_before(specs[0], "recipe")
    with pytest.raises(sweep.SettingsChanged, match="recipe: 1 there, 2 now") as error:
        sweep.plan("cluster", ["tv"], [0], options, tmp_path / "s")
    assert error.value.keys == ["recipe"] and "an earlier recipe" in str(error.value)


def test_a_sweep_starts_new_runs_without_a_missing_checkpoint_warning(tmp_path):
    """Only a run with a checkpoint is resumed; a new one starts without the warning that a
    user's --resume on an empty folder gets."""
    import warnings

    specs = sweep.plan("cluster", ["kl"], [0], {"data": "simplex:3", "n_steps": 2}, tmp_path / "s")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no checkpoint")
        assert sweep.run_sweep(specs, verbose=False) == []
