"""
Wire types of the sync protocol, and the JSON shape each one owns.

Version 1 (paths under ``/v1``):

- ``POST /v1/push`` takes ``{"protocol": 1, "changes": [Change, ...]}`` (gzip body
  welcome) and answers a :class:`PushResult`.
- ``GET /v1/pull?cursor=N&limit=M`` answers a :class:`PullPage`: the current state of
  every record changed after ``cursor``, one entry per record however often it changed.
  With ``packed=1`` (added within version 2; an older hub ignores it), a record whose
  columns all carry one version has that version alone as its ``versions``.
- ``POST /v1/status`` takes a :class:`StatusReport` (added within version 2: an older
  hub answers 404 and the office carries on).

A change's stamp travels without its node name: the hub takes the node from the
bearer token, so an office can only ever write as itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from shared.clock import Timestamp, are_stamps
from shared.errors import ProtocolError, VersionMismatchError

PROTOCOL_VERSION = 2


def dumps(data: Any) -> bytes:
    """JSON as UTF-8 bytes, compact (orjson: about ten times json.dumps' speed).

    Floats are written as Python's repr writes them, so they read back exactly.
    """
    return orjson.dumps(data)


def dumps_text(data: Any) -> str:
    """:func:`dumps`, as text (for SQLite TEXT columns)."""
    return orjson.dumps(data).decode("utf-8")


def loads(data: bytes | str) -> Any:
    """Parse JSON; raise ValueError (orjson.JSONDecodeError) if it is not valid."""
    return orjson.loads(data)


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


OPS = ("insert", "update", "delete")
_WRITES = ("insert", "update")
_NO_BASE: dict[str, str] = {}


def _good_base(base: dict[Any, Any]) -> bool:
    """True if ``base`` maps column names to canonical version stamps."""
    return all(type(k) is str for k in base) and are_stamps(base.values())


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{what}: field {name!r} is missing or not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "an integer",
        str: "a string",
        dict: "an object",
        list: "a list",
        bool: "true/false",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


@dataclass(frozen=True, slots=True)
class Change:
    """One row-level write, as recorded in a node's change log."""

    seq: int  # position in the origin node's change log
    table: str
    pk: dict[str, Any]
    op: str  # insert, update or delete
    ts: Timestamp
    values: dict[str, Any] | None  # columns the write set; None for a delete
    base: dict[str, str] = field(default_factory=dict)  # column -> version seen when made
    captured: int | None = None  # the stamp first given, if ts was re-stamped since

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seq": self.seq,
            "table": self.table,
            "pk": self.pk,
            "op": self.op,
            "ts": self.ts.hlc,
            "base": self.base,
        }
        if self.values is not None:
            data["values"] = self.values
        if self.captured is not None and self.captured != self.ts.hlc:
            data["captured"] = self.captured
        return data

    @property
    def receipt(self) -> int:
        """The stamp that names this change for good (re-stamping does not alter it)."""
        return self.ts.hlc if self.captured is None else self.captured

    @classmethod
    def from_json(cls, data: Any, node: str) -> Change:
        """Read a change pushed by ``node``; raise ProtocolError if malformed."""
        if type(data) is dict:
            # The common shape, checked in one go; anything else takes the long way,
            # which names what is wrong.
            seq, table, pk, op, hlc = (data.get(k) for k in ("seq", "table", "pk", "op", "ts"))
            base = data.get("base", _NO_BASE)
            values = data.get("values")
            if (
                type(seq) is int
                and 0 < seq < 2**63
                and type(table) is str
                and type(pk) is dict
                and type(hlc) is int
                and 0 < hlc < 2**63
                and type(base) is dict
                and "captured" not in data
                and (op == "delete" or (op in _WRITES and type(values) is dict and values))
                and (not base or _good_base(base))
            ):
                if op == "delete":
                    values = None
                if base is _NO_BASE:
                    base = {}
                return cls(seq, table, pk, op, Timestamp(hlc, node), values, base)
        if not isinstance(data, dict):
            raise ProtocolError(f"a change must be an object, got {type(data).__name__}")
        seq = _field(data, "seq", int, "change")
        if not 0 < seq < 2**63:
            raise ProtocolError(f"change {seq}: seq must be a positive 64-bit integer")
        what = f"change {seq}"
        table = _field(data, "table", str, what)
        pk = _field(data, "pk", dict, what)
        op = data.get("op")
        if op not in OPS:
            raise ProtocolError(f"{what}: op must be one of {', '.join(OPS)}, got {op!r}")
        hlc = _field(data, "ts", int, what)
        if hlc <= 0 or hlc >= 2**63:
            raise ProtocolError(f"{what}: ts {hlc} is out of range")
        base = data.get("base", {})
        if not isinstance(base, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in base.items()
        ):
            raise ProtocolError(f"{what}: base must map column names to version strings")
        for version in base.values():
            try:
                Timestamp.parse(version)
            except ValueError as exc:
                raise ProtocolError(f"{what}: base has {exc}") from None
        values = data.get("values")
        if op == "delete":
            values = None
        elif not isinstance(values, dict) or not values:
            raise ProtocolError(f"{what}: an {op} needs a non-empty 'values' object")
        captured = data.get("captured")
        if captured is not None and (type(captured) is not int or not 0 < captured < 2**63):
            raise ProtocolError(f"{what}: captured must be a positive integer stamp")
        return cls(seq, table, pk, op, Timestamp(hlc, node), values, base, captured)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A change the hub set aside, why, and the record as the hub holds it (if at all)."""

    seq: int
    reason: str
    record: PullRow | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "reason": self.reason,
            "record": self.record.to_json() if self.record else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> Rejection:
        if not isinstance(data, dict):
            raise ProtocolError("a rejection must be an object")
        record = data.get("record")
        return cls(
            _field(data, "seq", int, "rejection"),
            _field(data, "reason", str, "rejection"),
            PullRow.from_json(record) if record is not None else None,
        )


@dataclass(frozen=True, slots=True)
class PushResult:
    """The hub's answer to a push: what it committed and what it found.

    ``acked`` covers rejected changes too: the hub has dealt with them, and the
    office keeps them aside (see ``rejected``) instead of sending them again.
    """

    acked: int  # the highest change-log seq of this node the hub has dealt with
    applied: int  # changes applied by this request (replays count zero)
    conflicts: int  # conflicts this request logged
    hub_time_ms: int
    node: str
    rejected: list[Rejection] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "acked": self.acked,
            "applied": self.applied,
            "conflicts": self.conflicts,
            "hub_time_ms": self.hub_time_ms,
            "node": self.node,
            "rejected": [r.to_json() for r in self.rejected],
        }

    @classmethod
    def from_json(cls, data: Any) -> PushResult:
        check_version(data, "push result")
        rejected = data.get("rejected", [])
        if not isinstance(rejected, list):
            raise ProtocolError("push result: field 'rejected' is not a list")
        return cls(
            _field(data, "acked", int, "push result"),
            _field(data, "applied", int, "push result"),
            _field(data, "conflicts", int, "push result"),
            _field(data, "hub_time_ms", int, "push result"),
            _field(data, "node", str, "push result"),
            [Rejection.from_json(r) for r in rejected],
        )


@dataclass(frozen=True, slots=True)
class PullRow:
    """The hub's current state of one record."""

    seq: int
    table: str
    pk: dict[str, Any]
    values: dict[str, Any] | None  # every column; None when the record is deleted
    # column -> version (text form of a Timestamp); or, when asked for (packed), one
    # version alone for a record whose every column has it (one only ever inserted)
    versions: dict[str, str] | str

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seq": self.seq,
            "table": self.table,
            "pk": self.pk,
            "versions": self.versions,
        }
        if self.values is not None:
            data["values"] = self.values
        return data

    @classmethod
    def from_json(cls, data: Any) -> PullRow:
        if type(data) is dict:  # the common shape in one go; the long way names faults
            seq, table, pk, values, versions = (
                data.get(k) for k in ("seq", "table", "pk", "values", "versions")
            )
            if (
                type(seq) is int
                and type(table) is str
                and type(pk) is dict
                and (values is None or type(values) is dict)
                and (type(versions) is dict or type(versions) is str)
            ):
                return cls(seq, table, pk, values, versions)
        if not isinstance(data, dict):
            raise ProtocolError("a pulled row must be an object")
        values = data.get("values")
        if values is not None and not isinstance(values, dict):
            raise ProtocolError("a pulled row's values must be an object")
        return cls(
            _field(data, "seq", int, "pulled row"),
            _field(data, "table", str, "pulled row"),
            _field(data, "pk", dict, "pulled row"),
            values,
            _field(data, "versions", (dict, str), "pulled row"),
        )


@dataclass(frozen=True, slots=True)
class PullPage:
    """One page of records changed after a cursor, and the cursor to ask for next."""

    rows: list[PullRow]
    cursor: int
    more: bool
    hub_time_ms: int
    node: str
    acked: int = 0  # the highest change number of this office the hub has committed
    remaining: int | None = None  # records left after the cursor (asked for with count)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "rows": [row.to_json() for row in self.rows],
            "cursor": self.cursor,
            "more": self.more,
            "hub_time_ms": self.hub_time_ms,
            "node": self.node,
            "acked": self.acked,
            **({"remaining": self.remaining} if self.remaining is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> PullPage:
        check_version(data, "pull page")
        rows = _field(data, "rows", list, "pull page")
        return cls(
            [PullRow.from_json(row) for row in rows],
            _field(data, "cursor", int, "pull page"),
            _field(data, "more", bool, "pull page"),
            _field(data, "hub_time_ms", int, "pull page"),
            _field(data, "node", str, "pull page"),
            _field(data, "acked", int, "pull page") if "acked" in data else 0,
            _field(data, "remaining", int, "pull page") if "remaining" in data else None,
        )


def check_version(data: Any, what: str) -> None:
    """Raise unless ``data`` is an object of this protocol version."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    version = data.get("protocol")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"{what} speaks protocol {version!r}, this side speaks {PROTOCOL_VERSION}; "
            "upgrade fieldsync so both sides match"
        )


# -- status reports (POST /v1/status) ----------------------------------------------

MAX_EVENTS_PER_REPORT = 100
MAX_ERROR_CHARS = 1000
OUTCOMES = ("ok", "error")


def _optional(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if data.get(name) is None:
        return None
    return _field(data, name, kind, what)


def _count(data: Mapping[str, Any], name: str, what: str) -> int:
    value = _field(data, name, int, what)
    if value < 0:
        raise ProtocolError(f"{what}: field {name!r} must not be negative")
    return int(value)


def _time_text(data: Mapping[str, Any], name: str, what: str, required: bool = False) -> Any:
    value = _field(data, name, str, what) if required else _optional(data, name, str, what)
    if value is not None:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ProtocolError(f"{what}: field {name!r} is not an ISO 8601 time") from None
    return value


def _error_text(value: str | None) -> str | None:
    return None if value is None else value[:MAX_ERROR_CHARS]


@dataclass(frozen=True, slots=True)
class SyncEvent:
    """One sync as the office saw it: when, how long, how much, and how it ended."""

    id: int  # the office's own number for it: reports are idempotent
    started_at: str
    seconds: float
    outcome: str  # ok or error
    pushed: int = 0
    pulled: int = 0
    conflicts: int = 0
    rejected: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    error: str | None = None
    error_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "started_at": self.started_at,
            "seconds": self.seconds,
            "outcome": self.outcome,
            "pushed": self.pushed,
            "pulled": self.pulled,
            "conflicts": self.conflicts,
            "rejected": self.rejected,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "error": self.error,
            "error_code": self.error_code,
        }

    @classmethod
    def from_json(cls, data: Any) -> SyncEvent:
        what = "a sync event"
        if not isinstance(data, dict):
            raise ProtocolError(f"{what} must be an object")
        seconds = _field(data, "seconds", (int, float), what)
        outcome = _field(data, "outcome", str, what)
        if outcome not in OUTCOMES or not 0 <= seconds < 10**7:
            raise ProtocolError(f"{what}: outcome must be ok or error, seconds >= 0")
        return cls(
            id=_count(data, "id", what),
            started_at=_time_text(data, "started_at", what, required=True),
            seconds=float(seconds),
            outcome=outcome,
            pushed=_count(data, "pushed", what),
            pulled=_count(data, "pulled", what),
            conflicts=_count(data, "conflicts", what),
            rejected=_count(data, "rejected", what),
            bytes_sent=_count(data, "bytes_sent", what),
            bytes_received=_count(data, "bytes_received", what),
            error=_error_text(_optional(data, "error", str, what)),
            error_code=_optional(data, "error_code", str, what),
        )


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What an office tells the hub about itself after each sync (never case data)."""

    pending: int  # changes waiting to be pushed
    oldest_pending_at: str | None  # when the oldest of them was made
    rejected: int  # changes the hub rejected, kept aside at the office
    clock_offset_ms: int  # how far the office clock is behind the hub's
    version: str  # the office's fieldsync version
    interval_seconds: float | None = None  # its sync interval, when it runs the agent
    last_error: str | None = None
    last_error_code: str | None = None
    last_error_at: str | None = None
    events: list[SyncEvent] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "pending": self.pending,
            "oldest_pending_at": self.oldest_pending_at,
            "rejected": self.rejected,
            "clock_offset_ms": self.clock_offset_ms,
            "version": self.version,
            "interval_seconds": self.interval_seconds,
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
            "last_error_at": self.last_error_at,
            "events": [e.to_json() for e in self.events],
        }

    @classmethod
    def from_json(cls, data: Any) -> StatusReport:
        what = "the status report"
        check_version(data, what)
        events = _field(data, "events", list, what)
        if len(events) > MAX_EVENTS_PER_REPORT:
            raise ProtocolError(f"{what} carries over {MAX_EVENTS_PER_REPORT} sync events")
        interval = _optional(data, "interval_seconds", (int, float), what)
        if interval is not None and not 0 < interval < 10**7:
            raise ProtocolError(f"{what}: interval_seconds must be positive")
        version = _field(data, "version", str, what)
        return cls(
            pending=_count(data, "pending", what),
            oldest_pending_at=_time_text(data, "oldest_pending_at", what),
            rejected=_count(data, "rejected", what),
            clock_offset_ms=_field(data, "clock_offset_ms", int, what),
            version=version[:40],
            interval_seconds=None if interval is None else float(interval),
            last_error=_error_text(_optional(data, "last_error", str, what)),
            last_error_code=_optional(data, "last_error_code", str, what),
            last_error_at=_time_text(data, "last_error_at", what),
            events=[SyncEvent.from_json(e) for e in events],
        )
