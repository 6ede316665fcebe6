"""The command line: --help, settings errors naming the variable, and the token command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jwt
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command with ``env``; a free port unless ``PORT`` is given (not the default 8080,
    which a ``make run`` beside the suite holds, and whose check comes before the others)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "MONGODB_", "PORT"))}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, "PORT": str(_free_port()), **env},
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout and "token" in out.stdout
    # The description names what README's opening does: every upstream and every front door.
    words = " ".join(out.stdout.split())
    for named in ("Gemini", "Anthropic", "demo", "/v1/chat/completions", "/v1/messages"):
        assert named in words, named


def test_invalid_setting_stops_startup_naming_the_variable():
    out = run("serve", PORT="eighty", MONGODB_URI="mongodb://x", JWT_SECRET="s" * 40)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "PORT" in lines[0]


def test_production_without_key_or_uri_stops_with_clear_message(tmp_path):
    out = run("serve", ENVIRONMENT="production", MONGODB_URI="mongodb://x", DATA_DIR=str(tmp_path))
    assert out.returncode == 2 and "JWT_SECRET" in out.stderr
    out = run("serve", ENVIRONMENT="production", JWT_SECRET="s" * 40)
    assert out.returncode == 2 and "MONGODB_URI" in out.stderr


def test_token_command_signs_with_configured_secret():
    secret = "k" * 64
    out = run("token", "--user", "alice", "--ttl", "120", JWT_SECRET=secret)
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120


def test_local_mode_dev_key_is_stable_across_runs(tmp_path):
    first = run("token", "--user", "a", ENVIRONMENT="local", DATA_DIR=str(tmp_path))
    second = run("token", "--user", "a", ENVIRONMENT="local", DATA_DIR=str(tmp_path))
    assert first.returncode == second.returncode == 0
    secret = (tmp_path / "dev-jwt-secret").read_text().strip()
    for out in (first, second):
        assert jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "a"


def test_bad_gemini_safety_settings_stop_startup_in_one_line(tmp_path):
    out = run(
        "serve",
        MONGODB_URI="mongodb://127.0.0.1:1",
        JWT_SECRET="s" * 40,
        GEMINI_SAFETY_SETTINGS='{"category": "x"}',
        DATA_DIR=str(tmp_path),
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "GEMINI_SAFETY_SETTINGS" in lines[0], out.stderr


# ---------------------------------------------------------------- start-up refusals, one line each
def one_line(out: subprocess.CompletedProcess[str], name: str) -> str:
    """The process stopped with exit code 2 and one stderr line naming ``name``, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"chat-gateway: invalid setting {name}: "), lines[0]
    return lines[0]


SERVE_ENV = {"MONGODB_URI": "mongodb://127.0.0.1:1", "MONGODB_TIMEOUT_MS": "200"}


def test_dev_token_endpoint_is_refused_outside_local_mode(tmp_path):
    for environment in ("production", None):
        env = {"ENVIRONMENT": environment} if environment else {}
        out = run(
            "serve",
            JWT_SECRET="s" * 40,
            DEV_TOKEN_ENDPOINT="true",
            DATA_DIR=str(tmp_path),
            **SERVE_ENV,
            **env,
        )
        line = one_line(out, "DEV_TOKEN_ENDPOINT")
        assert "ENVIRONMENT=local" in line and "mint" in line


@pytest.mark.parametrize(("algorithm", "minimum"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_a_secret_shorter_than_the_hash_is_refused(algorithm, minimum, tmp_path):
    for command in (("serve",), ("token", "--user", "a")):
        out = run(
            *command,
            JWT_ALGORITHM=algorithm,
            JWT_SECRET="s" * (minimum - 1),
            DATA_DIR=str(tmp_path),
            **SERVE_ENV,
        )
        line = one_line(out, "JWT_SECRET")
        assert f"{minimum - 1} bytes" in line and f"at least {minimum}" in line
        assert "s" * 8 not in line  # the secret itself is never echoed
    ok = run("token", "--user", "a", JWT_ALGORITHM=algorithm, JWT_SECRET="é" * (minimum // 2))
    assert ok.returncode == 0, ok.stderr  # bytes of the UTF-8 secret, not characters
    assert ok.stderr == ""


def test_local_mode_dev_secret_satisfies_the_longest_hash(tmp_path):
    out = run(
        "token", "--user", "a", ENVIRONMENT="local", JWT_ALGORITHM="HS512", DATA_DIR=str(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "dev-jwt-secret").read_bytes().strip()) >= 64


def test_a_secret_with_an_asymmetric_algorithm_names_jwt_secret():
    out = run("serve", JWT_ALGORITHM="RS256", JWT_SECRET="x", **SERVE_ENV)
    line = one_line(out, "JWT_SECRET")
    assert "RS256" in line


@pytest.mark.parametrize("name", ["MODELS_FILE", "JWT_PUBLIC_KEY", "JWT_JWKS"])
def test_a_missing_file_is_named_in_one_line(name, tmp_path):
    missing = str(tmp_path / "missing.json")
    env = {"JWT_SECRET": "s" * 40} if name == "MODELS_FILE" else {"JWT_ALGORITHM": "RS256"}
    out = run("serve", **{name: missing}, **env, DATA_DIR=str(tmp_path), **SERVE_ENV)
    line = one_line(out, name)
    assert missing in line


def test_a_public_key_that_is_not_a_key_is_named_in_one_line(tmp_path):
    path = tmp_path / "key.pem"
    path.write_text("not a key\n")
    out = run("serve", JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=str(path), **SERVE_ENV)
    assert "not a RS256 public key" in one_line(out, "JWT_PUBLIC_KEY")
    short = _public_key_file(tmp_path, bits=1024)
    out = run("serve", JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=short, **SERVE_ENV)
    assert "1024 bits" in one_line(out, "JWT_PUBLIC_KEY")


def test_token_with_a_missing_private_key_names_the_option(tmp_path):
    missing = str(tmp_path / "missing.pem")
    out = run(
        "token",
        "--user",
        "a",
        "--private-key",
        missing,
        JWT_ALGORITHM="RS256",
        JWT_PUBLIC_KEY=_public_key_file(tmp_path),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--private-key" in lines[0] and missing in lines[0], out.stderr


def test_an_unreachable_jwks_url_is_named_in_one_line():
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/jwks.json"
    out = run("serve", JWT_ALGORITHM="RS256", JWT_JWKS=url, **SERVE_ENV)
    line = one_line(out, "JWT_JWKS")
    assert f"cannot fetch {url}" in line


def test_an_unresolvable_host_is_named_in_one_line():
    out = run("serve", HOST="no-such-host.invalid", JWT_SECRET="s" * 40, **SERVE_ENV)
    line = one_line(out, "HOST")
    assert "no-such-host.invalid" in line


def test_a_port_in_use_is_named_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("serve", HOST="127.0.0.1", PORT=str(port), JWT_SECRET="s" * 40, **SERVE_ENV)
    line = one_line(out, "PORT")
    assert f"{port} is in use" in line


def _public_key_file(tmp_path, bits: int = 2048) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    return str(path)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--user", ""], "--user"),
        (["--user", "   "], "--user"),
        (["--user", "x" * 257], "--user"),
        (["--user", "alice", "--ttl", "0"], "--ttl"),
        (["--user", "alice", "--ttl", "-5"], "--ttl"),
        (["--user", "alice", "--ttl", "soon"], "--ttl"),
    ],
)
def test_token_refuses_a_user_or_ttl_the_server_would_refuse(args, option):
    """No token is printed that the server would refuse: a blank subject, one the server's
    own rule refuses (too long), one already expired."""
    out = run("token", *args, JWT_SECRET="k" * 64)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert f"argument {option}:" in out.stderr.strip().splitlines()[-1], out.stderr


def test_token_help_states_what_user_and_ttl_must_be():
    out = run("token", "--help")
    assert out.returncode == 0
    assert "not blank" in out.stdout and "> 0" in out.stdout


# ---------------------------------------------------------------- an administrator's token
async def test_an_admin_token_carries_the_configured_claim_and_opens_the_admin_routes(
    aiohttp_client, make_settings
):
    """``token --admin`` sets ADMIN_CLAIM to ADMIN_ROLE (not a fixed ``role: admin``): the app
    with the same settings answers its admin routes to it, and 403 to the plain token."""
    from service.app import create_app
    from tests.conftest import TEST_SECRET

    env = {"JWT_SECRET": TEST_SECRET, "ADMIN_CLAIM": "groups", "ADMIN_ROLE": "operators"}
    admin = run("token", "--user", "root", "--admin", **env)
    plain = run("token", "--user", "root", **env)
    assert admin.returncode == plain.returncode == 0, admin.stderr + plain.stderr
    claims = jwt.decode(admin.stdout.strip(), TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "root" and claims["groups"] == "operators"
    assert "groups" not in jwt.decode(plain.stdout.strip(), TEST_SECRET, algorithms=["HS256"])

    client = await aiohttp_client(
        create_app(make_settings(admin_claim="groups", admin_role="operators"))
    )
    for out, status in ((admin, 200), (plain, 403)):
        headers = {"Authorization": f"Bearer {out.stdout.strip()}"}
        resp = await client.get("/api/admin/users", headers=headers)
        assert resp.status == status, await resp.text()


def test_token_admin_refuses_an_admin_claim_it_would_overwrite():
    out = run("token", "--user", "root", "--admin", JWT_SECRET="k" * 64, ADMIN_CLAIM="sub")
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "chat-gateway: invalid setting ADMIN_CLAIM: --admin cannot set the registered claim "
        "'sub' to 'admin'"
    ]


@pytest.mark.parametrize(("admin", "role"), [("1", "admin"), ("0", None), ("", None)])
def test_make_token_admin_1_prints_an_administrator_s_token(admin, role, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "ADMIN_", "MAKE"))}
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", ROOT, "token", "user=ops", f"admin={admin}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "DATA_DIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    secret = (tmp_path / "dev-jwt-secret").read_text().strip()
    claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "ops" and claims.get("role") == role


# ---------------------------------------------------------------- values that could never work
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("OPENAI_BASE_URL", "not a url", "not an absolute http(s) URL"),
        ("GEMINI_BASE_URL", "generativelanguage.googleapis.com/v1beta", "absolute http(s) URL"),
        ("ANTHROPIC_BASE_URL", "https://api.anthropic.com:99999", "not a URL"),
        ("WS_ALLOWED_ORIGINS", "chat.example.com", "(e.g. https://chat.example.com)"),
        ("UPSTREAM_RETRY_BASE_S", "10", "longer than UPSTREAM_RETRY_MAX_S (8 s)"),
    ],
)
def test_a_value_every_request_would_fail_on_stops_start_up(name, value, expected, tmp_path):
    """A base URL that is no http(s) URL started, then every send was a 502 naming an
    exception class; an origin without its scheme started, then refused the real browser."""
    out = run("serve", JWT_SECRET="s" * 40, DATA_DIR=str(tmp_path), **{name: value}, **SERVE_ENV)
    assert expected in one_line(out, name)


@pytest.mark.parametrize(
    "origins",
    [
        "chat.example.com",
        "https://chat.example.com/app",
        "https://",
        "https://user@chat.example.com",
        "https://chat.example.com,http://localhost:99999",
    ],
)
def test_an_allowed_origin_is_scheme_host_and_port(origins):
    from service.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"^invalid setting WS_ALLOWED_ORIGINS: '.*' is not an"):
        load_settings(ws_allowed_origins=origins)


@pytest.mark.parametrize(
    ("origins", "said"),
    [
        ("null", "any sandboxed frame"),
        ("https://*.example.com", "matched whole"),
        ("https://chat.example.com:443/", "leaves the default port out"),
        ("http://chat.example.com:80", "(http://chat.example.com)"),
    ],
)
def test_an_origin_no_browser_sends_or_every_page_sends_is_refused(origins, said):
    """Entries that parse but never match (a wildcard host, a default port a browser leaves
    out) or match every sandboxed frame and local file (``null``): said at start-up."""
    from service.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"^invalid setting WS_ALLOWED_ORIGINS: ") as info:
        load_settings(ws_allowed_origins=origins)
    assert said in str(info.value)


def test_what_is_a_valid_url_or_origin_still_starts():
    from service.settings import load_settings

    load_settings(
        ws_allowed_origins=" https://chat.example.com/, http://localhost:5173,capacitor://localhost,",
        openai_base_url="http://127.0.0.1:8000/v1/",
        anthropic_base_url="https://api.anthropic.com/v1",
        upstream_retry_base_s=2,
        upstream_retry_max_s=2,
    )
    load_settings(ws_allowed_origins="*")
