"""Task scaffolding: typed configs from YAML and the command line."""

from __future__ import annotations

import pytest

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


def test_numbers_for_bools_and_huge_numbers_for_floats():
    assert coerce("bool", 1, "x") is True and coerce("bool", 0, "x") is False
    with pytest.raises(ValueError, match="is not a float"):
        coerce("float", 10**400, "x")


def test_every_field_declares_its_help_once():
    """Help texts live in the field metadata (option()), which --help shows."""
    import dataclasses

    from beyond_icon.cli import build_parser
    from beyond_icon.tasks.common import help_text
    from beyond_icon.tasks.sne import SNEConfig
    from beyond_icon.tasks.supcon import SupConConfig

    for cls in (ClusterConfig, SNEConfig, SupConConfig):
        assert not hasattr(cls, "help")
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
    assert help_text(ClusterConfig, "lr") == "Adam learning rate"
    text = build_parser()._subparsers._group_actions[0].choices["cluster"].format_help()
    assert "Adam learning rate (default: 0.01)" in " ".join(text.split())


def test_finish_writes_files_then_metrics_and_prints_one_line(tmp_path, capsys):
    import json

    from beyond_icon.tasks.common import finish

    order = []
    finish({"acc": 0.5, "n": 3}, tmp_path, True, lambda out: order.append(sorted(out.iterdir())))
    assert order == [[]]  # the task's files come before metrics.json
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"acc": 0.5, "n": 3}
    assert capsys.readouterr().out.strip() == "acc=0.5000 n=3"


_FAST = {  # a few seconds of training each
    "cluster": ["--n-steps", "5", "--kmeans-init", "0", "--n-heads", "2"],
    "supcon": ["--epochs", "1", "--backbone", "mlp", "--probe-epochs", "1"],
    "sne": ["--n-steps", "4", "--batch-size", "100", "--perplexity", "10"],
}


@pytest.mark.parametrize(
    "task, bad, message",
    [
        ("cluster", ["--n-clusters", "1"], "n_clusters must be in [2,"),
        ("supcon", ["--batch-size", "1"], "batch_size must be at least 2"),
        ("sne", ["--perplexity", "500"], "perplexity 500 needs more than"),
        # options checked by the training loop's own config, also before the folder is touched
        ("cluster", ["--weight-decay", "-1"], "weight_decay must be a number >= 0"),
        ("supcon", ["--warmup-epochs", "1"], "warmup_epochs must be an integer in [0, epochs = 1)"),
    ],
)
def test_a_refused_run_leaves_an_earlier_run_in_its_folder(tmp_path, capsys, task, bad, message):
    """Options are checked against the data before the folder is touched: a typo in a new
    run's options (no --resume) deletes nothing of the finished run already there."""
    from beyond_icon.cli import main

    out = tmp_path / "run"
    fast = _FAST[task]
    data = ["--data", "digits", "--n-train", "200", "--n-test", "80", "--device", "cpu"]
    assert main([task, *data, *fast, "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"config.yaml", "metrics.json"} <= set(before)
    capsys.readouterr()
    assert main([task, *data, *fast, *bad, "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
