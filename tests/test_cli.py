"""The command line: options from YAML and flags, one-line errors, --debug."""

from __future__ import annotations

import pytest

from beyond_icon.cli import main


def test_a_yaml_config_with_a_string_number_runs(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("task: cluster\ndata: simplex:3\nlr: 1e-3\nn_steps: 2\nkmeans_init: 0\n")
    assert main(["cluster", "--config", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    path.write_text("task: cluster\ndata: simplex:3\nlr: quick\n")
    assert main(["cluster", "--config", str(path), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("cluster option lr: 'quick' is not a float")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("yaml-syntax", "is not valid YAML: expected the node content"),
        ("config-folder", "is not a file"),
        ("out-file", "is a file, not a run folder"),
        ("module-syntax", "syntax error in"),
        ("truncated-npz", "is not a valid features file"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, case, expected):
    args = ["cluster", "--data", "simplex:3", "--n-steps", "1", "--kmeans-init", "0"]
    out = ["--out", str(tmp_path / "run")]
    if case == "yaml-syntax":
        (tmp_path / "c.yaml").write_text("task: cluster\nlr: [1,\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    elif case == "config-folder":
        args += ["--config", str(tmp_path)]
    elif case == "out-file":
        (tmp_path / "file").write_text("")
        out = ["--out", str(tmp_path / "file")]
    elif case == "module-syntax":
        (tmp_path / "m.py").write_text("def f(:\n")
        args += ["--divergence-module", f"{tmp_path / 'm.py'}:f"]
    else:
        import numpy as np

        np.savez(tmp_path / "f.npz", x=np.zeros((40, 3)), y=np.arange(40) % 2)
        (tmp_path / "f.npz").write_bytes((tmp_path / "f.npz").read_bytes()[:200])
        args[2] = f"embeddings:{tmp_path / 'f.npz'}"
    assert main(args + out + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a run folder"):
        main(["--debug", "cluster", "--data", "simplex:3", "--out", str(tmp_path / "file")])


def test_seed_beyond_int64_is_a_clear_error(tmp_path, capsys):
    code = main(["cluster", "--data", "simplex:3", "--seed", str(2**70), "--out", str(tmp_path)])
    assert code == 2 and "seed must be in [0, 2**63)" in capsys.readouterr().err
