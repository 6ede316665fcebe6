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


# A document or comment that points outside the repository ("see the design document",
# "reference 001") leaves a reader with nothing to follow: the repository must stand alone.
OUTSIDE_POINTERS = re.compile(r"\bshared/|\b[Rr]eference 0\d\d\b|\bARCHITECTURE\.md\b")
SCANNED = ("README.md", "Makefile", "pyproject.toml", "service", "docs", "deploy", "tests", "bench")
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".toml",
    ".yaml",
    ".yml",
    ".env",
    ".json",
    ".js",
    ".css",
    ".html",
    "",
}


def _scanned_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix not in TEXT_SUFFIXES:
                continue
            if file == Path(__file__).resolve():
                continue  # this file names the patterns it looks for
            yield file


def test_nothing_points_at_documents_outside_the_repository():
    found = []
    for file in _scanned_files():
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_POINTERS.search(line):
                found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
