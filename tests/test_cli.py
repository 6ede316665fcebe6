"""The command line: --help, settings errors naming the variable, and the token command."""

from __future__ import annotations

import os
import subprocess
import sys

import jwt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "MONGODB_", "PORT"))}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout and "token" in out.stdout


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
