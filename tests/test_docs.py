"""The README stays true: every setting is in its configuration table, and the commands exist."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import Settings
from tests.fake_openai import Script
from tests.sse_client import collect

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _readme_section(title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README.read_text(), re.S | re.M)
    assert found, f"README has no section '## {title}'"
    return found.group(1)


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    documented = re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, re.M)
    assert {name.upper() for name in Settings.model_fields} == set(documented)
    # The README says .env.example lists them "in the order of the table".
    assert documented == [name.upper() for name in Settings.model_fields]


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


# The chat page itself ("The chat page" in the README), not part of the API table.
PAGE_ROUTES = {("GET", "/"), ("GET", "/static/{path}")}


def test_every_route_is_in_the_readme_api_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray .env
    app = create_app(Settings(_env_file=None, dev_token_endpoint=True))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    routes = {(method, path) for method, path in routes if method != "HEAD"} - PAGE_ROUTES
    documented = set(re.findall(r"`([A-Z]+) (/[^`?\s]*)", _readme_section("API")))
    missing = sorted(f"{method} {path}" for method, path in routes - documented)
    assert not missing, f"routes missing from the README's API table: {missing}"
    stale = sorted(f"{method} {path}" for method, path in documented - routes)
    assert not stale, f"the README's API table names routes that do not exist: {stale}"


def _readme_log_examples() -> dict[str, dict]:
    block = re.search(r"```json\n(.*?)```", _readme_section("Logs"), re.S)
    assert block, "the README's Logs section has no JSON example"
    lines = [json.loads(line) for line in block.group(1).splitlines() if line.strip()]
    return {line["event"]: line for line in lines}


async def _logged(logs, event: str, deadline_s: float = 5.0, **match) -> dict:
    """The last ``event`` line matching ``match``, polling until it is there (an access line is
    written once the response has been sent, so it can trail the client's read)."""
    end = time.monotonic() + deadline_s
    while True:
        found = [e for e in logs if e["event"] == event and match.items() <= e.items()]
        if found:
            return found[-1]
        assert time.monotonic() < end, f"no {event} {match} logged within {deadline_s} s"
        await asyncio.sleep(0.01)


async def test_readme_log_examples_show_every_field_the_service_logs(stream_client, auth, logs):
    """The README's example lines have exactly the fields of the real lines of a turn over SSE
    (the real configuration adds ``timestamp``; the test capture adds ``log_level``)."""
    headers = auth()
    resp = await stream_client.post("/api/chat", json={}, headers=headers)
    chat_id = (await resp.json())["chat_id"]
    text = "A question the logs must not show"
    resp = await stream_client.post(
        f"/api/chat/{chat_id}/message", json={"message": text}, headers=headers
    )
    assert [e["event"] for e in await collect(resp)][-1] == "done"
    examples = _readme_log_examples()
    assert set(examples) == {"stream.started", "stream.first_token", "stream.ended", "http.request"}
    path = f"/api/chat/{chat_id}/message"
    real = {
        "stream.started": await _logged(logs, "stream.started", chat_id=chat_id),
        "stream.first_token": await _logged(logs, "stream.first_token", chat_id=chat_id),
        "stream.ended": await _logged(logs, "stream.ended", chat_id=chat_id),
        "http.request": await _logged(logs, "http.request", path=path),
    }
    for event, example in examples.items():
        shown, logged = set(example) - {"timestamp"}, set(real[event]) - {"log_level"}
        assert shown == logged, (
            f"{event}: README shows {sorted(shown - logged)} that the service does not log, "
            f"and omits {sorted(logged - shown)}"
        )
    assert text not in repr(logs)


def _env_example_comment(name: str) -> str:
    """The comment lines just above ``# NAME=...`` in .env.example, joined."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"# {name}="))
    comment: list[str] = []
    for line in reversed(lines[:at]):
        if not line.startswith("# ") or ENV_EXAMPLE_LINE.match(line) or line.startswith("# ---"):
            break
        comment.insert(0, line[2:])
    return " ".join(comment)


@pytest.mark.parametrize("keyed", [False, True])
async def test_on_disconnect_docs_name_the_turns_that_always_cancel(
    stream_client, fake_openai, auth, logs, keyed
):
    """A stateless /v1 stream stops when its client leaves unless it was sent with an
    Idempotency-Key (then it is resumable, detaches and completes): README's ON_DISCONNECT row and
    .env.example's comment both say so."""
    fake_openai.default = Script(chunks=["a ", "b ", "c"], usage=(5, 3), gate_after=1)
    headers = {**auth(), **({"Idempotency-Key": "leaves-1"} if keyed else {})}
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    resp = await stream_client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200
    assert (await resp.content.readline()).startswith(b"data: ")
    await asyncio.wait_for(fake_openai.reached_gate.wait(), 5)
    resp.close()  # the client goes while the upstream is held
    if keyed:
        await _logged(logs, "stream.detached")
        fake_openai.gate.set()
        line = await _logged(logs, "stream.ended", transport="openai")
        assert (line["outcome"], line["reason"]) == ("completed", "finished")
    else:
        line = await _logged(logs, "stream.ended", transport="openai")
        assert (line["outcome"], line["reason"]) == ("cancelled", "client_disconnect")

    row = re.search(r"^\| `ON_DISCONNECT` \|.*$", README.read_text(), re.M)
    assert row
    for text in (row.group(0), _env_example_comment("ON_DISCONNECT")):
        assert re.search(r"[Ss]tateless `?/v1`? turns.*without an `?Idempotency-Key`?", text), text


# A log event as the docs name it (`stream.ended`), and as the service logs it: a string literal.
LOG_EVENT = re.compile(
    r"`((?:stream|service|models|mongodb|admin|upstream|jwks|http|ws|store)"
    r"\.[a-z_]+)`"
)


def test_every_log_event_the_docs_send_operators_to_is_one_the_service_logs():
    """The README's Logs section and deploy/README.md's runbook tell operators which log lines
    to look for: a line the service never writes is a search that finds nothing, always."""
    deploy_readme = (ROOT / "deploy" / "README.md").read_text()
    runbook = re.search(r"^### Runbook\n(.*?)(?=^##|\Z)", deploy_readme, re.S | re.M)
    assert runbook, "deploy/README.md has no '### Runbook' section"
    named = set(LOG_EVENT.findall(_readme_section("Logs") + runbook.group(1)))
    assert "stream.ended" in named
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    logged = set(re.findall(r"""["']([a-z_]+\.[a-z_]+)["']""", source))
    assert not named - logged, f"the docs name log lines the service never writes: {named - logged}"
