"""
The hub link's settings and safety, without loading the HTTP client: whether a hub
URL and a token can be used at all (:func:`check_hub_url`, :func:`check_token`),
whether a hub URL would carry the office's token and case data across a network in
clear, and the check that
refuses such a URL unless plain http was allowed on purpose (``node init/set
--allow-http``). ``node status`` reads it too.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine: localhost, 127.0.0.0/8 or ::1."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unencrypted(url: str) -> bool:
    """Whether tokens and case data would cross a network in clear to reach ``url``."""
    return urlsplit(url).scheme == "http" and not is_loopback(url)


def check_link(url: str, allow_http: bool) -> None:
    """Refuse plain ``http://`` to another machine unless ``allow_http`` (ValueError)."""
    if is_unencrypted(url) and not allow_http:
        raise ValueError(
            f"refusing {url}: over http:// the office's token and its case data would "
            "travel unencrypted; use an https:// hub URL (see `fieldsync hub serve "
            "--certfile`), or pass --allow-http if the link is protected otherwise (a VPN)"
        )


def check_hub_url(url: str) -> str:
    """Return the hub's base URL (no trailing slash); raise ValueError if it is not one:
    http or https, a host, a valid port, no user, query or fragment."""
    if any(c <= " " or c == "\x7f" for c in url):
        raise ValueError(f"invalid hub URL {url!r}: it has spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises if it is not a number from 0 to 65535
    except ValueError as exc:
        raise ValueError(f"invalid hub URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"invalid hub URL {url!r}: it must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"invalid hub URL {url!r}: it names no host")
    if port == 0:
        raise ValueError(f"invalid hub URL {url!r}: port 0")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"invalid hub URL {url!r}: give the token with --token, not in the URL")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"invalid hub URL {url!r}: it cannot have a query or fragment")
    return url.rstrip("/")


def check_token(token: str) -> str:
    """Return ``token`` if it can be sent as a bearer token, else raise ValueError."""
    if not token or not token.isascii() or not all(" " < c < "\x7f" for c in token):
        raise ValueError(
            "invalid token: give the one `fieldsync hub add-node` printed "
            "(printable ASCII, no spaces)"
        )
    return token
