"""The README stays true: every setting is in its configuration table, and the commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, re.M))
    assert {name.upper() for name in Settings.model_fields} == documented


def test_readme_commands_exist_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("install", "run", "test", "token", "lint", "ci-deps"):
        assert re.search(rf"^{target}:", makefile, re.M), target
