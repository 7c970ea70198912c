"""The hub link: which URLs carry the token in clear, and how the client verifies the
hub (nothing loaded for http://, a private CA alone when given one)."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
import trustme

from node.client import HttpHubClient, tls_context
from node.link import check_link, is_loopback, is_unencrypted
from shared.errors import FieldsyncError


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.8.9.10", True),
        ("http://localhost:8000", True),
        ("http://LOCALHOST.:8000", True),
        ("http://[::1]:8000", True),
        ("http://10.0.0.5:8000", False),
        ("http://hub.example.org", False),
        ("http://localhost.example.org", False),
        ("http://[::ffff:10.0.0.1]", False),
        ("http://[2001:db8::1]:8000", False),
    ],
)
def test_loopback_is_this_machine_only(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback
    assert is_unencrypted(url) is not loopback
    assert not is_unencrypted(url.replace("http://", "https://"))


def test_check_link_refuses_plain_http_to_another_machine_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"unencrypted.*--allow-http"):
        check_link("http://hub.example.org:8000", allow_http=False)
    check_link("http://hub.example.org:8000", allow_http=True)
    check_link("http://127.0.0.1:8000", allow_http=False)
    check_link("https://hub.example.org", allow_http=False)


def test_no_ca_bundle_is_loaded_for_plain_http(tmp_path: Path) -> None:
    context = tls_context("http://127.0.0.1:8000", str(tmp_path / "unused.pem"))
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] == 0  # trusts nothing: fails closed
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert tls_context("https://hub.example.org", None) is True  # the usual public CAs


def test_a_private_ca_is_the_only_one_trusted(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    context = tls_context("https://hub.example.org", str(path))
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "not-pem"])
def test_a_ca_file_that_cannot_be_used_is_one_clear_error(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FieldsyncError, match=f"cannot use the CA file {path}: ") as caught:
        tls_context("https://hub.example.org", str(path))
    assert "\n" not in str(caught.value)


def test_a_client_for_plain_http_is_cheap_to_make() -> None:
    """Issue 14: loading the CA bundle for an http:// hub cost ~48 ms of CPU per client."""
    started = time.process_time()
    for _ in range(20):
        HttpHubClient("http://127.0.0.1:9", "token").close()
    per_client = (time.process_time() - started) / 20
    assert per_client < 0.005, f"{per_client * 1000:.1f} ms of CPU per client"
