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


# `.env.example` lists every setting as a commented-out `# NAME=default` line.
ENV_EXAMPLE = ROOT / ".env.example"
ENV_EXAMPLE_LINE = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", re.M)


def test_env_example_names_every_setting_once_in_the_settings_order():
    names = [name for name, _ in ENV_EXAMPLE_LINE.findall(ENV_EXAMPLE.read_text())]
    fields = [name.upper() for name in Settings.model_fields]
    missing = set(fields) - set(names)
    assert not missing, f"add {sorted(missing)} to .env.example (with its default and a comment)"
    assert names == fields, "one line per setting, grouped and ordered as in service/settings.py"


def test_env_example_uncommented_gives_exactly_the_defaults(tmp_path, monkeypatch):
    """Uncommenting every line that has a value changes nothing: each value shown is the
    default. A line without a value is a setting that has none."""
    example = ENV_EXAMPLE_LINE.findall(ENV_EXAMPLE.read_text())
    for field in Settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    env_file = tmp_path / "from-example.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in example if value))
    shown = Settings(_env_file=env_file).model_dump()
    defaults = Settings(_env_file=None).model_dump()
    wrong = {k.upper(): (shown[k], defaults[k]) for k in defaults if shown[k] != defaults[k]}
    assert not wrong, (
        f".env.example shows values that are not the defaults (shown, default): {wrong}"
    )
    for name, value in example:
        if not value:
            assert Settings.model_fields[name.lower()].default in (None, ""), (
                f"{name} has a default: show it in .env.example"
            )


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
