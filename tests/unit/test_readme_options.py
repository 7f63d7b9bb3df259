"""The documentation's table of `[amlrun]` options is the one the provider declares: every option, its type and its
default as a user reads them, and no option that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from airflow_amlrun.config import OPTIONS

README = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
ROW = re.compile(
    r"^\| `(?P<option>[a-z_]+)` \| (?P<type>[a-z]+) \| (?P<default>[^|]*) \| (?P<meaning>[^|]+) \|$"
)


def readme_options() -> dict[str, tuple[str, str]]:
    """option -> (type, default) from the rows of the documented configuration table."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("`[amlrun]` options") :]
    table = table[: table.index("\n\n", table.index("| option |"))]
    rows = [ROW.match(line) for line in table.splitlines() if line.startswith("| `")]
    assert all(rows), "a row of the README's options table is not `| `option` | type | default | meaning |`"
    return {m["option"]: (m["type"], m["default"].strip()) for m in rows if m}


def test_the_readme_lists_every_option_with_its_type_and_default() -> None:
    listed = readme_options()
    assert sorted(listed) == sorted(OPTIONS), "the README's options table and config.OPTIONS differ"
    for name, option in OPTIONS.items():
        kind, default = listed[name]
        assert kind == option.type, f"README: {name} is a {kind}, the provider declares a {option.type}"
        if option.default:  # an empty default stands for a path the README spells out ($AIRFLOW_HOME/amlrun)
            assert default == f"`{option.default}`", (
                f"README: {name} defaults to {default}, not {option.default}"
            )
