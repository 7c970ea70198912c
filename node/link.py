"""
The hub link's safety, without loading the HTTP client: whether a hub URL would carry
the office's token and case data across a network in clear, and the check that
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
