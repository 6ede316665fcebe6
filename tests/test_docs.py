"""The README stays true: every setting is in its configuration table, and the commands exist."""

from __future__ import annotations

import re
import subprocess
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


def _phony_targets(makefile: str) -> list[str]:
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony, "the Makefile declares no .PHONY targets"
    return phony.group(1).split()


def test_make_alone_lists_every_public_target_with_what_it_does():
    """A newcomer typing `make` gets the list, not an install: `help` is the default goal, and
    every .PHONY target has a `## target: text` line that it prints."""
    targets = _phony_targets((ROOT / "Makefile").read_text())
    assert {"help", "install", "run", "token", "test", "lint", "check", "format"} <= set(targets)
    assert {"bench", "bench-quick", "ci-deps", "clean"} <= set(targets)
    proc = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    listed = dict(re.findall(r"^  make (\S+)\s+(.+)$", proc.stdout, re.M))
    assert sorted(listed) == sorted(targets), proc.stdout
    assert all(text.strip() for text in listed.values())


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
