"""
The node's side of the wire: :class:`HubClient` (the seam the agent depends on) and
:class:`HttpHubClient`, which speaks the sync protocol (``shared.protocol``) over HTTP
with httpx.

All HTTP error mapping happens here, in :func:`_hub_errors`: network failures,
timeouts and 5xx answers become :class:`HubUnavailableError` (retry later); 4xx
answers become :class:`HubRejectedError` subclasses chosen by the JSON ``error`` code.

The link: :func:`tls_context` decides how the hub is verified (the usual public CAs,
or a private CA's file; nothing is loaded for plain ``http://``); node/link.py says
which URLs would carry the token in clear.
"""

from __future__ import annotations

import gzip
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec

from shared import __version__
from shared.errors import (
    AuthError,
    ClockSkewError,
    DivergedError,
    FieldsyncError,
    HubRejectedError,
    HubUnavailableError,
    ProtocolError,
)
from shared.protocol import (
    PROTOCOL_VERSION,
    SCHEMA_HEADER,
    Change,
    ConflictPage,
    PullPage,
    PushResult,
    SchemaInfo,
    dumps,
    loads,
)
from shared.reports import StatusReport

if TYPE_CHECKING:
    from node.store import HubSettings

_T = TypeVar("_T")

# Every error code the hub answers with, and the exception it becomes here.
ERROR_CLASSES: dict[str, type[HubRejectedError]] = {
    "bad_request": HubRejectedError,
    "invalid_change": HubRejectedError,
    "version_mismatch": HubRejectedError,
    "too_large": HubRejectedError,
    "not_found": HubRejectedError,
    "method_not_allowed": HubRejectedError,
    "unauthorized": AuthError,
    "forbidden": AuthError,
    "clock_skew": ClockSkewError,
    "diverged": DivergedError,
    "refused": HubRejectedError,
    "upgrade_required": HubRejectedError,
    "revoked": AuthError,  # the office's token was revoked or replaced
    "throttled": HubRejectedError,  # admin sign-ins only
}


class HubClock(NamedTuple):
    """The hub's answer to "what time is it": its clock, in milliseconds since the
    epoch, and the last change number of this office it has dealt with (None from
    hubs that do not say)."""

    time_ms: int
    acked: int | None = None
    epoch: str = ""  # the hub's identity ("" from hubs that do not say; node/restore.py)
    schema_version: int | None = None  # the hub's schema version (None: it does not say)


class TokenOwner(NamedTuple):
    """The hub's answer about a token: accepted or not, and its office (None from hubs
    that do not say)."""

    accepted: bool
    node: str | None


class HubClient(Protocol):
    """What the sync agent needs from a hub."""

    def prepare_push(self, changes: Sequence[Change]) -> bytes: ...

    def push(self, changes: Sequence[Change], body: bytes | None = None) -> PushResult: ...

    def pull(
        self, cursor: int, limit: int, *, include_own: bool = False, count: bool = False
    ) -> PullPage: ...

    def hub_time(self) -> HubClock: ...

    def lost_edits(self, after: int, limit: int) -> ConflictPage: ...

    def schema(self) -> SchemaInfo: ...

    def use_schema_version(self, version: int) -> None: ...

    def report_status(self, report: StatusReport) -> bool: ...

    def traffic(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


def tls_context(url: str, ca_file: str | None) -> ssl.SSLContext | bool:
    """How the client verifies the hub: True (the usual public CAs), a context trusting
    the private CA in ``ca_file`` alone, or for ``http://`` an empty context that
    trusts nothing (loading the CA bundle costs about 20 ms of CPU, for nothing)."""
    if urlsplit(url).scheme != "https":
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise FieldsyncError(f"cannot use the CA file {ca_file}: {why}") from None


def _tls_failure(exc: BaseException) -> str | None:
    """What went wrong with TLS in a failed connection, in words, or None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_code in (62, 64):
            # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return (
                f"the hub's TLS certificate is for another name ({cause.verify_message}); "
                "use the host name or address the certificate was made for in the hub URL"
            )
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"the hub's TLS certificate is not trusted ({cause.verify_message}); if the "
                "hub uses a private CA, give its certificate with `fieldsync node set "
                "NODE.db --ca-file CA.pem`"
            )
        if isinstance(cause, ssl.SSLError):
            return (
                f"the TLS handshake failed ({cause.reason or cause}); is the hub serving "
                "https:// on that port?"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def _gzip(body: bytes) -> bytes:
    """A request body as sent: gzip level 3 (most of the gain of 9, at a third of the CPU)."""
    return gzip.compress(body, compresslevel=3)


@contextmanager
def _hub_errors(action: str, url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise HubUnavailableError(f"cannot {action} {url}: timed out ({exc})") from exc
    except httpx.TransportError as exc:
        why = _tls_failure(exc) or exc or type(exc).__name__
        raise HubUnavailableError(f"cannot {action} {url}: {why}") from exc


def _raise_for_status(response: httpx.Response, action: str, url: str) -> None:
    if response.status_code < 400:
        return
    hub_time: int | None = None
    details: dict[str, Any] = {}
    try:
        body = response.json()
        code, detail = str(body["error"]), str(body["detail"])
        hub_time = body.get("hub_time_ms") if isinstance(body.get("hub_time_ms"), int) else None
        details = {k: v for k, v in body.items() if k not in ("error", "detail", "hub_time_ms")}
    except (ValueError, KeyError, TypeError, AttributeError):
        code, detail = "", response.text[:200].strip() or response.reason_phrase
    if response.status_code >= 500 or response.status_code == 429:
        raise HubUnavailableError(
            f"cannot {action} {url}: the hub answered {response.status_code} ({detail})"
        )
    cls = ERROR_CLASSES.get(code, HubRejectedError)
    if response.status_code == 401:
        detail = f"{detail}; give the office a new token: `fieldsync node set NODE.db --token NEW`"
    raise cls(
        f"cannot {action} {url}: the hub refused it ({response.status_code} {code}): {detail}",
        code or "rejected",
        response.status_code,
        hub_time,
        details,
    )


class HttpHubClient:
    """Push and pull over HTTP; request bodies are gzipped."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_seconds: float = 60.0,
        client: httpx.Client | None = None,
        node: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # The office this client speaks for; the hub refuses a token of another office.
        self.node = node
        self._client = client or httpx.Client(
            timeout=timeout_seconds, verify=tls_context(self.url, ca_file)
        )
        self.bytes_sent = 0  # request and answer bodies, as on the wire
        self.bytes_received = 0
        self._traffic_lock = threading.Lock()
        self._headers = {
            "Authorization": f"Bearer {token}",
            "User-Agent": f"fieldsync/{__version__}",
        }

    @classmethod
    def from_settings(
        cls, settings: HubSettings, node: str | None = None, *, timeout_seconds: float = 60.0
    ) -> HttpHubClient:
        """A client for the hub an office's stored settings name."""
        return cls(
            settings.hub_url,
            settings.token,
            node=node,
            ca_file=settings.ca_file,
            timeout_seconds=timeout_seconds,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpHubClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def prepare_push(self, changes: Sequence[Change]) -> bytes:
        """The request body of a push of ``changes``, gzipped.

        The agent makes it for the next batch while the hub works on the one before,
        so that the hub is not kept waiting for it.
        """
        return _gzip(
            dumps(
                {
                    "protocol": PROTOCOL_VERSION,
                    **({"node": self.node} if self.node else {}),
                    "changes": [c.to_json() for c in changes],
                }
            )
        )

    def push(self, changes: Sequence[Change], body: bytes | None = None) -> PushResult:
        """Send a batch of changes; return what the hub committed.

        ``body``: what :meth:`prepare_push` made of ``changes``, if it was made ahead.
        """
        if body is None:
            body = self.prepare_push(changes)
        action = f"push {len(changes)} change{'' if len(changes) == 1 else 's'} to"
        response = self._post("/v1/push", body, action)
        _raise_for_status(response, action, self.url)
        return self._read(response, PushResult.from_json, action)

    def pull(
        self, cursor: int, limit: int, *, include_own: bool = False, count: bool = False
    ) -> PullPage:
        """Fetch the records changed after ``cursor``, at most ``limit`` of them.

        ``include_own`` also fetches records whose latest state came from this office;
        ``count`` asks how many records are left to pull (for a progress bar).
        """
        action = "pull from"
        with _hub_errors(action, self.url):
            response = self._client.get(
                f"{self.url}/v1/pull",
                params={
                    "cursor": cursor,
                    "limit": limit,
                    **({"node": self.node} if self.node else {}),
                    **({"own": 1} if include_own else {}),
                    **({"count": 1} if count else {}),
                    "packed": 1,
                    "scopes": 1,  # this office drops records that leave its scope
                },
                headers=self._headers,
            )
        self._count(response, 0)
        _raise_for_status(response, action, self.url)
        return self._read(response, PullPage.from_json, action)

    def lost_edits(self, after: int, limit: int) -> ConflictPage:
        """This office's edits that lost at the hub, logged or resolved after mark
        ``after`` (a pull page's ``conflicts`` says the newest)."""
        action = "fetch this office's conflicts from"
        with _hub_errors(action, self.url):
            response = self._client.get(
                f"{self.url}/v1/conflicts",
                params={"after": after, "limit": limit},
                headers=self._headers,
            )
        self._count(response, 0)
        _raise_for_status(response, action, self.url)
        return self._read(response, ConflictPage.from_json, action)

    def schema(self) -> SchemaInfo:
        """The hub's schema version and its TOML source."""
        action = "fetch the schema from"
        with _hub_errors(action, self.url):
            response = self._client.get(f"{self.url}/v1/schema", headers=self._headers)
        self._count(response, 0)
        _raise_for_status(response, action, self.url)
        return self._read(response, lambda body: msgspec.json.decode(body, type=SchemaInfo), action)

    def use_schema_version(self, version: int) -> None:
        """Send ``version`` (the office's schema version) with every push and pull."""
        self._headers[SCHEMA_HEADER] = str(version)

    def hub_time(self) -> HubClock:
        """The hub's clock, and how far it has dealt with this office's changes (from
        its health check, asked with the office's token)."""
        action = "reach"
        with _hub_errors(action, self.url):
            response = self._client.get(f"{self.url}/v1/health", headers=self._headers)
        _raise_for_status(response, action, self.url)
        body = self._json(response, action)
        value = body.get("hub_time_ms")
        if type(value) is not int:
            raise ProtocolError(f"cannot {action} {self.url}: its health check has no hub time")
        acked, epoch = body.get("acked"), body.get("epoch")
        schema = body.get("schema_version")
        return HubClock(
            value,
            acked if type(acked) is int and acked >= 0 else None,
            epoch if isinstance(epoch, str) else "",
            schema if type(schema) is int and schema > 0 else None,
        )

    def token_owner(self) -> TokenOwner:
        """Whether the hub accepts this client's token, and whose office it is (from
        its health check, asked with the token)."""
        action = "reach"
        with _hub_errors(action, self.url):
            response = self._client.get(f"{self.url}/v1/health", headers=self._headers)
        if response.status_code == 401:
            return TokenOwner(False, None)
        _raise_for_status(response, action, self.url)
        body = self._json(response, action)
        if not isinstance(body, dict) or type(body.get("hub_time_ms")) is not int:
            raise ProtocolError(f"cannot {action} {self.url}: is this a fieldsync hub?")
        node = body.get("node")
        # A hub answers "acked" (and "node") only to an office's token it accepts.
        return TokenOwner("acked" in body, node if isinstance(node, str) else None)

    def report_status(self, report: StatusReport) -> bool:
        """Tell the hub how this office is; False if the hub is too old to listen."""
        action = "report to"
        # The office named, as in a push or pull: a stray database sending another
        # office's token must not report as that office.
        body = {**report.to_json(), **({"node": self.node} if self.node else {})}
        response = self._post("/v1/status", _gzip(dumps(body)), action)
        if response.status_code == 404:
            return False
        _raise_for_status(response, action, self.url)
        return True

    def _post(self, path: str, content: bytes, action: str) -> httpx.Response:
        """POST a gzipped JSON body (see :func:`_gzip`) and count its bytes."""
        with _hub_errors(action, self.url):
            response = self._client.post(
                f"{self.url}{path}",
                content=content,
                headers={
                    **self._headers,
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                },
            )
        self._count(response, len(content))
        return response

    def traffic(self) -> tuple[int, int]:
        """Bytes of request and answer bodies so far, as sent on the wire."""
        return self.bytes_sent, self.bytes_received

    def _count(self, response: httpx.Response, sent: int) -> None:
        with self._traffic_lock:  # a pull page may be fetched ahead, in another thread
            self.bytes_sent += sent
            self.bytes_received += response.num_bytes_downloaded

    def _json(self, response: httpx.Response, action: str) -> Any:
        return self._read(response, loads, action)

    def _read(self, response: httpx.Response, read: Callable[[bytes], _T], action: str) -> _T:
        """The answer's body read by ``read`` (a wire type's ``from_json``, or ``loads``)."""
        try:
            return read(response.content)
        except ValueError as exc:
            raise ProtocolError(
                f"cannot {action} {self.url}: the answer is not JSON; is this a fieldsync hub?"
            ) from exc
