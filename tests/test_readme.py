"""The README's configuration table and the settings the code declares (config/__init__.py DEFAULTS)
cannot part: every setting is listed once, with its default, and nothing else is listed."""

from __future__ import annotations

import re

from config import DEFAULTS, ENV_PREFIX
from tests.conftest import REPO


def configuration_rows() -> list[tuple[list[str], str]]:
    """(variables, default cell) for each row of the table under '## Configuration'."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and ENV_PREFIX in cells[0]:
            rows.append((re.findall(rf"`{ENV_PREFIX}([A-Z0-9_]+)`", cells[0]), cells[1]))
    return rows


def documented_default(value) -> str:
    """How the table writes a default: none, empty, or the value in backticks (JSON's true/false)."""
    if value is None:
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def test_every_setting_is_documented_once_with_its_default():
    rows = configuration_rows()
    listed = [name for names, _default in rows for name in names]
    assert all(len(names) == 1 for names, _default in rows), "one setting a row, so each default is checkable"
    assert sorted(name for name in listed if listed.count(name) > 1) == [], "listed more than once"
    assert sorted(set(DEFAULTS) - set(listed)) == [], "settings missing from the README"
    assert sorted(set(listed) - set(DEFAULTS)) == [], "README rows for settings the code does not have"
    for (name,), default in rows:
        expected = documented_default(DEFAULTS[name])
        assert default == expected or default.startswith(expected + ":"), f"{name}: README {default}, code {expected}"
