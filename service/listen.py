"""Whether the server can listen on HOST:PORT, said in one line naming the variable.

``check_listen_address`` runs before anything is started, so a HOST that does not resolve or a
PORT that is taken stops ``serve`` at once instead of after connecting to MongoDB. It binds the
way asyncio's ``create_server`` (under aiohttp's ``TCPSite``) will: every address HOST resolves
to, ``SO_REUSEADDR`` on, IPv6 sockets IPv6-only. Another process may still take the port in
between; ``listen_error`` turns the bind's ``OSError`` into the same message then.
"""

from __future__ import annotations

import errno
import socket

from service.settings import SettingsError


class AddressInUse(SettingsError):
    """PORT is taken (``make run`` words its own advice on that)."""


def check_listen_address(host: str, port: int) -> None:
    if port == 0:  # the system picks a free port
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise listen_error(exc, host, port) from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise listen_error(exc, host, port) from None


def listen_error(exc: OSError, host: str, port: int) -> SettingsError:
    """The one-line message for a failure to listen, naming HOST or PORT."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return SettingsError(f"invalid setting HOST: cannot resolve {host!r} ({reason})")
    if exc.errno == errno.EADDRINUSE:
        return AddressInUse(
            f"invalid setting PORT: port {port} is in use on {host}; set PORT to a free port"
        )
    if exc.errno == errno.EACCES:
        problem = f"PORT: no permission to listen on port {port} (below 1024 needs privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        problem = f"HOST: {host!r} is not an address of this machine"
    else:
        problem = f"HOST: cannot listen on {host}:{port} ({reason})"
    return SettingsError(f"invalid setting {problem}")
