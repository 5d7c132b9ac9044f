"""Task scaffolding: typed configs from YAML and the command line."""

from __future__ import annotations

import pytest

from beyond_icon.cli import main
from beyond_icon.tasks.cluster import ClusterConfig
from beyond_icon.tasks.common import coerce, config_from_dict


def test_yaml_strings_are_coerced_to_the_field_types():
    # PyYAML reads 1e-3 as the string "1e-3" and "no" as a string when quoted
    config = config_from_dict(
        ClusterConfig,
        {"lr": "1e-3", "download": "no", "n_steps": "1e3", "n_clusters": "null", "seed": 3.0},
    )
    assert config.lr == 0.001 and config.download is False and config.n_steps == 1000
    assert config.n_clusters is None and config.seed == 3 and isinstance(config.seed, int)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", "fast", "cluster option lr: 'fast' is not a float"),
        ("download", "maybe", "cluster option download: 'maybe' is not a bool"),
        ("n_heads", 2.5, "cluster option n_heads: 2.5 is not an int"),
        ("n_heads", True, "cluster option n_heads: True is not an int"),
        ("divergence", 3, "cluster option divergence: 3 is not a str"),
        ("seed", None, "cluster option seed: None is not an int"),
    ],
)
def test_wrong_types_are_one_line_errors(key, value, expected):
    with pytest.raises(ValueError, match=expected):
        config_from_dict(ClusterConfig, {key: value})


def test_lists_from_text_or_yaml():
    assert coerce("list[int]", "1, 2,3", "x") == [1, 2, 3]
    assert coerce("list[str]", ["kl", "tv"], "x") == ["kl", "tv"]


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


def test_numbers_for_bools_and_huge_numbers_for_floats():
    assert coerce("bool", 1, "x") is True and coerce("bool", 0, "x") is False
    with pytest.raises(ValueError, match="is not a float"):
        coerce("float", 10**400, "x")


def test_seed_beyond_int64_is_a_clear_error(tmp_path, capsys):
    code = main(["cluster", "--data", "simplex:3", "--seed", str(2**70), "--out", str(tmp_path)])
    assert code == 2 and "seed must be in [0, 2**63)" in capsys.readouterr().err
