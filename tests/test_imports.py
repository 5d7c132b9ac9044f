"""Loading a user's object from path.py:NAME or module:NAME."""

from __future__ import annotations

import pytest

from beyond_icon._imports import load_object


def test_file_and_module_specs(tmp_path):
    (tmp_path / "mine.py").write_text("VALUE = 41 + 1\n")
    assert load_object(f"{tmp_path / 'mine.py'}:VALUE", "thing") == 42
    assert load_object("math:pi", "thing") == pytest.approx(3.14159265)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("no-colon", ValueError, "path.py:NAME or module:NAME"),
        ("/nowhere/x.py:f", FileNotFoundError, "does not exist"),
        ("math:nothing_here", ValueError, "defines no 'nothing_here'"),
        ("no_such_module_xyz:f", ImportError, "no_such_module_xyz"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, error, message):
    with pytest.raises(error, match=message):
        load_object(spec, "thing")
