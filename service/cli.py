"""Command line: ``python -m service serve`` and ``python -m service token``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service import __version__
from service.settings import Settings, SettingsError, load_settings, require_server_settings

DESCRIPTION = """\
Streaming chat gateway: streams LLM answers from OpenAI-compatible upstreams, Gemini,
Anthropic or a built-in offline demo model, over SSE, WebSocket, an OpenAI-compatible API
(/v1/chat/completions) and an Anthropic-compatible one (/v1/messages), keeping chats,
messages and per-user usage and budgets in MongoDB.

All settings come from the environment (or a .env file); see README.md for the table.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="start the HTTP server (HOST, PORT, MONGODB_URI, JWT_* ... from the environment)",
    )
    token = sub.add_parser("token", help="print a bearer token signed with the configured JWT key")
    token.add_argument(
        "--user",
        required=True,
        type=_user,
        help="the user id (the token's 'sub'): not blank, and a subject the server accepts",
    )
    token.add_argument(
        "--ttl", type=_ttl, default=3600, help="lifetime in seconds, > 0 (default 3600)"
    )
    token.add_argument(
        "--private-key", help="PEM file to sign with, for RS*/ES*/EdDSA (HS* uses JWT_SECRET)"
    )
    token.add_argument(
        "--admin",
        action="store_true",
        help="an administrator's token (/api/admin): its ADMIN_CLAIM claim is ADMIN_ROLE "
        "(default: role=admin)",
    )
    return parser


def _user(value: str) -> str:
    """``--user``: not blank, and a subject the server accepts (``check_subject``)."""
    from service.auth import check_subject

    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty or blank")
    problem = check_subject(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"the server refuses this subject: it {problem}")
    return value


def _ttl(value: str) -> int:
    """``--ttl``: a whole number of seconds above 0 (a token that is born expired is no use)."""
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds > 0, not {value!r}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        settings = load_settings()
        if args.command == "token":
            print(_token(settings, args.user, args.ttl, args.private_key, admin=args.admin))
        else:
            _serve(settings)
    except SettingsError as exc:
        print(f"chat-gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(settings: Settings) -> None:
    """Check everything that can be checked before starting, then serve until a signal."""
    require_server_settings(settings)
    from service.listen import check_listen_address
    from service.models import load_catalogue
    from service.providers.gemini import parse_safety_settings

    load_catalogue(settings)  # a bad catalogue entry stops start-up here, by name
    parse_safety_settings(settings.gemini_safety_settings)
    check_listen_address(settings.host, settings.port)
    from service.app import run
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    run(settings)  # a key or JWKS that cannot be loaded raises SettingsError, by name


# Claims the token command sets itself: an ADMIN_CLAIM among them would replace one of them.
REGISTERED_CLAIMS = frozenset({"sub", "iat", "exp", "iss", "aud", "nbf", "jti"})


def _token(
    settings: Settings, user: str, ttl: int, private_key: str | None, *, admin: bool = False
) -> str:
    import jwt

    from service.auth import mint_token

    extra = None
    if admin:
        if settings.admin_claim in REGISTERED_CLAIMS:
            raise SettingsError(
                f"invalid setting ADMIN_CLAIM: --admin cannot set the registered claim "
                f"'{settings.admin_claim}' to '{settings.admin_role}'"
            )
        extra = {settings.admin_claim: settings.admin_role}
    pem = None if private_key is None else _read_private_key(private_key)
    try:
        return mint_token(settings, user, ttl_s=ttl, private_key=pem, extra=extra)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        if pem is None:
            raise SettingsError(str(exc)) from None
        raise SettingsError(
            f"invalid --private-key: {private_key} is not a {settings.jwt_algorithm} private key"
        ) from None


def _read_private_key(path: str) -> str:
    try:
        pem = Path(path).read_text()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise SettingsError(f"invalid --private-key: cannot read {path} ({reason})") from None
    if "-----BEGIN" not in pem:
        raise SettingsError(f"invalid --private-key: {path} is not a PEM file")
    return pem
