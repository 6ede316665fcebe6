"""The chat page over plain HTTP: the SPA and its static files, and the dev token endpoint."""

from __future__ import annotations

import hashlib
import re

import pytest

from service.api.page import CSP, STATIC_DIR, _loopback
from service.app import create_app


async def test_index_is_served_with_security_headers(client):
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    html = await resp.text()
    assert '<script type="module" src="/static/js/app.js"></script>' in html
    # Everything the page loads is local: no CDN, no inline script.
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "<script>" not in html


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/static/js/app.js", "text/javascript; charset=utf-8"),
        ("/static/js/sse.js", "text/javascript; charset=utf-8"),
        ("/static/js/ws.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
        ("/static/vendor/marked.esm.js", "text/javascript; charset=utf-8"),
        ("/static/vendor/purify.es.mjs", "text/javascript; charset=utf-8"),
    ],
)
async def test_static_files_have_their_content_types(client, path, content_type):
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == content_type
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    body = await resp.read()
    assert body == (STATIC_DIR / path.removeprefix("/static/")).read_bytes()


async def test_static_files_revalidate_with_304(client):
    first = await client.get("/static/js/app.js")
    etag = first.headers["ETag"]
    again = await client.get("/static/js/app.js", headers={"If-None-Match": etag})
    assert again.status == 304


async def test_every_module_import_resolves_to_a_served_file(client):
    """The page has no bundler: each relative import must exist where it points."""
    for path in sorted((STATIC_DIR / "js").glob("*.js")):
        for name in re.findall(r'from "(\.{1,2}/[\w./-]+\.m?js)"', path.read_text()):
            served = (
                "/static/" + (STATIC_DIR / "js" / name).resolve().relative_to(STATIC_DIR).as_posix()
            )
            resp = await client.get(served)
            assert resp.status == 200, f"{path.name} imports {name}"
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_vendored_libraries_are_the_versions_their_readme_names():
    """service/static/vendor/README.md names each file's package, version and SHA-256: the
    files are those, unchanged (the header names the version; the hash is the package's)."""
    vendor = STATIC_DIR / "vendor"
    readme = (vendor / "README.md").read_text()
    versions = dict(
        re.findall(r"^\| `([\w.-]+)` \(`[\w./-]+`\) \| [^|]+ \| ([\d.]+) \|", readme, re.M)
    )
    hashes = dict(re.findall(r"^\| `([\w.-]+)` \| `([0-9a-f]{64})` \|$", readme, re.M))
    assert versions == {"marked.esm.js": "18.2.1", "purify.es.mjs": "3.5.0"}
    assert set(hashes) == set(versions)
    scripts = {p.name for p in vendor.iterdir() if p.suffix in (".js", ".mjs")}
    assert scripts == set(versions), "every vendored script is in the README, and only those"
    headers = {"marked.esm.js": "marked v{}", "purify.es.mjs": "DOMPurify {}"}
    for name, version in versions.items():
        data = (vendor / name).read_bytes()
        assert headers[name].format(version) in data[:400].decode()
        assert hashlib.sha256(data).hexdigest() == hashes[name], name
    for licence in ("LICENSE.marked", "LICENSE.dompurify", "LICENSE-MPL.dompurify"):
        assert (vendor / licence).stat().st_size > 500


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/../settings.py", "/static/%2e%2e/app.py", "/static/js"]
)
async def test_unknown_static_paths_are_json_404(client, path):
    resp = await client.get(path)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_the_page_assets_need_no_token(client):
    for path in ("/", "/static/js/app.js"):
        assert (await client.get(path)).status == 200


async def test_dev_token_endpoint_does_not_exist_when_off(client):
    resp = await client.get("/api/dev/token", params={"user": "alice"})
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/json")
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_dev_token_when_on_authenticates_as_that_user(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(dev_token_endpoint=True)))
    resp = await client.get("/api/dev/token", params={"user": "carol"})
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["user"] == "carol"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] > 0
    headers = {"Authorization": f"Bearer {body['token']}"}
    created = await client.post("/api/chat", json={"title": "mine"}, headers=headers)
    assert created.status == 201
    listed = await (await client.get("/api/chat", headers=headers)).json()
    assert [c["title"] for c in listed["chats"]] == ["mine"]
    # Another dev user does not see carol's chat.
    other = await (await client.get("/api/dev/token", params={"user": "dave"})).json()
    theirs = await client.get("/api/chat", headers={"Authorization": f"Bearer {other['token']}"})
    assert (await theirs.json())["chats"] == []


async def test_the_page_under_another_path_has_the_page_s_headers(client):
    """``/static/index.html`` is the page too: it cannot be framed or load another origin's
    script any more than ``/``."""
    for path in ("/", "/static/index.html", "/static/js/app.js"):
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.headers["Content-Security-Policy"] == CSP
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"


async def test_dev_token_answers_a_loopback_name_only(aiohttp_client, make_settings):
    """A page whose name was rebound to 127.0.0.1 (DNS rebinding) asks with its own name in
    Host: refused, so it cannot read a token; this machine's names get one."""
    client = await aiohttp_client(create_app(make_settings(dev_token_endpoint=True)))
    for host in ("attacker.example:8080", "attacker.example", "10.0.0.5:8080", "::1"):
        resp = await client.get("/api/dev/token", headers={"Host": host})
        assert resp.status == 403, host
        assert (await resp.json())["error"]["code"] == "dev_token_local_only"
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "app.localhost"):
        resp = await client.get("/api/dev/token", headers={"Host": host})
        assert resp.status == 200, host


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("a.localhost", True),
        ("10.0.0.5", False),
        ("192.168.1.20", False),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.5", False),
        ("localhost.attacker.example", False),
        ("", False),
        (None, False),
    ],
)
def test_what_counts_as_this_machine_for_the_dev_token(host, loopback):
    """The peer's address (so ``HOST=0.0.0.0`` gives no token to the network) and the Host
    name are both held to this."""
    assert _loopback(host) is loopback


async def test_dev_token_rejects_odd_user_names(aiohttp_client, make_settings):
    client = await aiohttp_client(create_app(make_settings(dev_token_endpoint=True)))
    resp = await client.get("/api/dev/token", params={"user": "a b<script>"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_user"
    default = await client.get("/api/dev/token")
    assert (await default.json())["user"] == "dev"


def test_every_error_code_the_service_sends_has_a_sentence_on_the_page():
    """The page never shows a code alone: each code the service can send (our own, the
    upstream's, and those /v1 names differently) is a key of errors.js's sentences."""
    from service.errors import UPSTREAM_STATUS
    from service.http import _OPENAI_CODES

    codes = set(UPSTREAM_STATUS) | {code for _, _, code in _OPENAI_CODES.values()}
    for path in (STATIC_DIR.parent).rglob("*.py"):
        text = path.read_text()
        codes |= set(re.findall(r'\bcode\s*=\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'"code":\s*"([a-z_]+)"', text))
        codes |= {f"{what}_not_found" for what in re.findall(r'not_found\("([a-z ]+)"\)', text)}
    sentences = (STATIC_DIR / "js" / "errors.js").read_text()
    known = set(re.findall(r"^  ([a-z_]+): ", sentences, re.M))
    assert len(codes) > 40, sorted(codes)
    assert not codes - known, f"no sentence for: {sorted(codes - known)}"
