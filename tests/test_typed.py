"""The typed getters shared by the configuration's checker and ``policies.Options``
(``nfqlb.typed.TableReader``): one wording, each reader raising its own error."""

from __future__ import annotations

import enum
from typing import Any

import pytest

from nfqlb.errors import ConfigError
from nfqlb.policies import Options, PolicyOptionError
from nfqlb.typed import TableReader


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


# (getter call, table value, problem): the wording the configuration and policies had before
# the getters were shared, byte for byte.
CASES: list[tuple[str, Any, str]] = [
    ("text", None, "is required"),
    ("text", "", "must be a non-empty string, not ''"),
    ("text", 3, "must be a non-empty string, not 3"),
    ("integer", True, "must be an integer, not True"),
    ("integer", "7", "must be an integer, not '7'"),
    ("integer", 70, "70 is out of range 1-10"),
    ("number", "x", "must be a number, not 'x'"),
    ("number", 0.5, "0.5 is out of range 1.0-2.0"),
    ("flag", 1, "must be true or false, not 1"),
    ("seconds", 0, "must be a positive number of seconds, not 0"),
    ("seconds", False, "must be a positive number of seconds, not False"),
    ("choice", "green", "'green' is not one of: red, blue"),
    ("address", 5, "must be an IP address string, not 5"),
    ("address", "nope", "'nope' is not an IP address"),
    ("address", "0.0.0.0", "0.0.0.0 cannot be used here (unspecified or multicast)"),
    ("subset", [], "must be a non-empty list of names out of src, dst; not []"),
    ("subset", ["sport"], "'sport' is not one of: src, dst"),
    ("subset", ["src", "src"], "['src', 'src'] names a field twice"),
]


def call(reader: TableReader, getter: str) -> Any:
    return {
        "text": lambda: reader.text("x"),
        "integer": lambda: reader.integer("x", 5, 1, 10),
        "number": lambda: reader.number("x", 1.5, 1.0, 2.0),
        "flag": lambda: reader.flag("x", True),
        "seconds": lambda: reader.seconds("x", 1.0),
        "choice": lambda: reader.choice("x", Color, "red"),
        "address": lambda: reader.address("x"),
        "subset": lambda: reader.subset("x", ["src"], ["src", "dst"]),
    }[getter]()


def table(value: Any) -> dict[str, Any]:
    return {} if value is None else {"x": value}


@pytest.mark.parametrize(("getter", "value", "problem"), CASES)
def test_options_raise_policy_option_error(getter: str, value: Any, problem: str) -> None:
    with pytest.raises(PolicyOptionError) as exc:
        call(Options(table(value), {"x"}), getter)
    assert (exc.value.key, exc.value.problem) == ("x", problem)
    assert str(exc.value) == f"policy_options.x: {problem}"


@pytest.mark.parametrize(("getter", "value", "problem"), CASES)
def test_config_checker_raises_config_error(getter: str, value: Any, problem: str) -> None:
    from nfqlb.config import _Checker

    with pytest.raises(ConfigError) as exc:
        call(_Checker("f.toml", "service[0]", table(value), {"x"}), getter)
    assert str(exc.value) == f"f.toml: service[0].x: {problem}"


def test_values_read() -> None:
    opts = Options({"a": 3, "b": 1.5, "c": False, "d": "hi", "e": ["dst", "src"]},
                   {"a", "b", "c", "d", "e", "f"})
    assert opts.integer("a", 1, 0, 9) == 3 and opts.number("b", 1.0, 0, 9) == 1.5
    assert opts.flag("c", True) is False and opts.text("d") == "hi"
    assert opts.subset("e", ["src"], ["src", "dst"]) == ("src", "dst")
    assert opts.get("f", "dflt") == "dflt" and opts.options["a"] == 3


def test_unknown_option() -> None:
    with pytest.raises(PolicyOptionError, match=r"^policy_options.y: unknown option "
                       r"\(known: x\)$"):
        Options({"y": 1}, {"x"})
    with pytest.raises(PolicyOptionError, match="it takes no options"):
        Options({"y": 1}, ())
