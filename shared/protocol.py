"""
Wire types of the sync protocol. Each message is declared once, as a msgspec Struct:
that declaration checks what arrives (in one pass with the JSON parsing) and gives the
JSON Schema of the hub's OpenAPI document (``hub/openapi.py``).

The protocol's version is :data:`PROTOCOL_VERSION`, named here only (the paths keep
the ``/v1`` of the first version):

- ``POST /v1/push`` takes a :class:`PushRequest`, ``{"protocol": PROTOCOL_VERSION,
  "changes": [PushedChange, ...]}`` (gzip body welcome), and answers a
  :class:`PushResult`.
- ``GET /v1/pull?cursor=N&limit=M`` answers a :class:`PullPage`: the current state of
  every record changed after ``cursor``, one entry per record however often it changed.
  With ``packed=1`` (added within version 2; an older hub ignores it), a record whose
  columns all carry one version has that version alone as its ``versions``.
- ``POST /v1/status`` takes a :class:`shared.reports.StatusReport` (added within
  version 2: an older hub answers 404 and the office carries on).

A change's stamp travels without its node name: the hub takes the node from the
bearer token, so an office can only ever write as itself. So the :class:`Change` the
code holds (its ``ts`` a :class:`Timestamp`, with the node) is read from and written
as a :class:`PushedChange` (its ``ts`` the bare stamp).

Reading: what msgspec cannot say is checked right after it (a version's text form, an
insert's non-empty values). A push refused there is read again the long way, field by
field, which words the refusal as offices have always shown it; a refusal of another
message names what msgspec found wrong, and where.

Writing: each type's ``to_json`` gives the object and orjson writes the bytes, as they
always were: msgspec writes ``1e16`` where orjson (and so every office and hub so far)
writes ``1e+16``, and the constructors' argument order, which code relies on, is not
always the wire's key order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeVar, get_args

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.clock import Timestamp, are_stamps
from shared.errors import ProtocolError, VersionMismatchError

PROTOCOL_VERSION: Final = 2
# The request header in which an office sends its schema version with push and pull
# (absent: a fieldsync from before schema versions; see hub/app.py).
SCHEMA_HEADER: Final = "Fieldsync-Schema"

# -- limits: what one request may hold (the hub answers 413 too_large past them) -------

INT64_MAX: Final = 2**63 - 1  # every integer on the wire fits SQLite's 64 bits
MAX_PUSH_BYTES: Final = 16 * 1024 * 1024  # a push body as sent (gzip or not)
MAX_INFLATED_PUSH_BYTES: Final = 64 * 1024 * 1024  # a push body once inflated
MAX_CHANGES_PER_PUSH: Final = 10_000
# JSON values (objects, arrays, strings, numbers...) in one push, counted before parsing
MAX_PUSH_VALUES: Final = 1_000_000
MAX_JSON_BODY_BYTES: Final = 1024 * 1024  # any other JSON body (a status report, a decision)


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


# -- field types ---------------------------------------------------------------------

_STAMP_TEXT = "[0-9a-f]{16}-[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"

Stamp = Annotated[
    int, Meta(gt=0, le=2**63 - 1, description="HLC stamp: wall_ms << 16 | counter (64-bit)")
]
Seq = Annotated[int, Meta(gt=0, le=2**63 - 1, description="position in the office's change log")]
Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
Int64 = Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)]
# Checked after decoding (shared.clock.are_stamps does a whole map in one go), so the
# pattern is for the schema only.
VersionText = Annotated[
    str,
    Meta(
        description="a version: the stamp in 16 hex digits, '-', the office that made it",
        extra_json_schema={"pattern": f"^{_STAMP_TEXT}$"},
    ),
]
IsoTime = Annotated[
    str, Meta(description="ISO 8601 time", extra_json_schema={"format": "date-time"})
]

Op = Literal["insert", "update", "delete"]
OPS: tuple[str, ...] = get_args(Op)


class _Unversioned(Struct, frozen=True, tag_field="protocol", tag=-1):
    """Never sent. msgspec takes a missing tag for a message's version when that is the
    only type it reads; read alongside this one, the version must be there."""


# -- push ----------------------------------------------------------------------------


class PushedChange(Struct, frozen=True):
    """A change as an office sends it (see :class:`Change`)."""

    seq: Seq
    table: str
    pk: dict[str, Any]
    op: Op
    ts: Stamp
    base: dict[str, VersionText] = msgspec.field(default_factory=dict)  # version seen
    values: dict[str, Any] | None = None  # the columns an insert or update sets
    captured: Stamp | None = None  # the stamp first given, when ts was re-stamped since


class PushRequest(Struct, frozen=True, tag_field="protocol", tag=PROTOCOL_VERSION):
    """A batch of an office's changes, in increasing ``seq`` order."""

    changes: Annotated[list[PushedChange], Meta(max_length=MAX_CHANGES_PER_PUSH)]
    node: str | None = None  # the office it thinks it is; the hub checks the token agrees


class Change(Struct, frozen=True):
    """One row-level write, as recorded in a node's change log."""

    seq: int  # position in the origin node's change log
    table: str
    pk: dict[str, Any]
    op: str  # insert, update or delete
    ts: Timestamp
    values: dict[str, Any] | None  # columns the write set; None for a delete
    base: dict[str, str] = msgspec.field(default_factory=dict)  # column -> version seen
    captured: int | None = None  # the stamp first given, if ts was re-stamped since

    def to_json(self) -> dict[str, Any]:
        """The change as pushed (a :class:`PushedChange`)."""
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
        try:
            change = _as_change(msgspec.convert(data, PushedChange), node)
        except msgspec.ValidationError:
            change = None
        return change or _change_the_long_way(data, node)


def _as_change(pushed: PushedChange, node: str) -> Change | None:
    """``pushed`` as pushed by ``node``, or None if what msgspec cannot check is wrong."""
    values = pushed.values
    if pushed.op == "delete":
        values = None
    elif not values:
        return None
    if pushed.base and not are_stamps(pushed.base.values()):
        return None
    ts = Timestamp(pushed.ts, node)
    return Change(
        pushed.seq, pushed.table, pushed.pk, pushed.op, ts, values, pushed.base, pushed.captured
    )


_PUSH = msgspec.json.Decoder(PushRequest | _Unversioned)


def read_push(body: bytes, node: str) -> tuple[str | None, list[Change]] | None:
    """The office named in a push body and its changes, as pushed by ``node``; None if
    anything is amiss, for the caller to read it the long way (``loads``,
    :func:`check_version`, :meth:`Change.from_json`), which says what."""
    try:
        request = _PUSH.decode(body)
    except (msgspec.DecodeError, RecursionError):  # a ValidationError too; nested too deep
        return None
    if not isinstance(request, PushRequest):
        return None
    changes = []
    for pushed in request.changes:
        change = _as_change(pushed, node)
        if change is None:
            return None
        changes.append(change)
    return request.node, changes


def _change_the_long_way(data: Any, node: str) -> Change:
    """Read a change field by field, to say what is wrong with it in the words offices
    have shown since version 1 (only once the quick read has refused it)."""
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
    return Change(seq, table, pk, op, Timestamp(hlc, node), values, base, captured)


def _field(data: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{what}: field {name!r} is missing or not {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {int: "an integer", str: "a string", dict: "an object"}


# -- pull ----------------------------------------------------------------------------

# What a pulled row decodes to without "versions" (refused after decoding): the
# constructor's order, values before versions, asks for a default.
_NO_VERSIONS: dict[str, str] = {}


class PullRow(Struct, frozen=True):
    """The hub's current state of one record."""

    seq: int
    table: str
    pk: dict[str, Any]
    values: dict[str, Any] | None = None  # every column; None when the record is deleted
    # column -> version (text form of a Timestamp); or, when asked for (packed), one
    # version alone for a record whose every column has it (one only ever inserted)
    versions: dict[str, VersionText] | VersionText = msgspec.field(
        default_factory=lambda: _NO_VERSIONS
    )
    # The record left the office's scope (moved to another office): the office drops
    # its copy without capturing a delete. Sent to offices that ask with scopes=1.
    gone: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seq": self.seq,
            "table": self.table,
            "pk": self.pk,
            "versions": self.versions,
        }
        if self.values is not None:
            data["values"] = self.values
        if self.gone:
            data["gone"] = True
        return data

    @classmethod
    def from_json(cls, data: Any) -> PullRow:
        return _read(cls, data, "pulled row")


class Rejection(Struct, frozen=True):
    """A change the hub set aside, why, and the record as the hub holds it (if at all)."""

    seq: int
    reason: str
    record: PullRow | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "reason": self.reason,
            "record": self.record.to_json() if self.record else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> Rejection:
        return _read(cls, data, "rejection")


class PushResult(Struct, frozen=True, tag_field="protocol", tag=PROTOCOL_VERSION):
    """The hub's answer to a push: what it committed and what it found.

    ``acked`` covers rejected changes too: the hub has dealt with them, and the
    office keeps them aside (see ``rejected``) instead of sending them again.
    """

    acked: int  # the highest change-log seq of this node the hub has dealt with
    applied: int  # changes applied by this request (replays count zero)
    conflicts: int  # conflicts this request logged
    hub_time_ms: int
    node: str
    rejected: list[Rejection] = msgspec.field(default_factory=list)
    # The hub's identity: another than before means it was restored from a backup.
    epoch: str = ""
    schema_version: int = 0  # the hub's schema version (0: a hub that does not say)

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "acked": self.acked,
            "applied": self.applied,
            "conflicts": self.conflicts,
            "hub_time_ms": self.hub_time_ms,
            "node": self.node,
            "rejected": [r.to_json() for r in self.rejected],
            **({"epoch": self.epoch} if self.epoch else {}),
            **({"schema_version": self.schema_version} if self.schema_version else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> PushResult:
        """Read the hub's answer (parsed JSON, or its bytes); ProtocolError if malformed."""
        return _read(cls, data, "push result")


class PullPage(Struct, frozen=True, tag_field="protocol", tag=PROTOCOL_VERSION):
    """One page of records changed after a cursor, and the cursor to ask for next."""

    rows: list[PullRow]
    cursor: int
    more: bool
    hub_time_ms: int
    node: str
    acked: int = 0  # the highest change number of this office the hub has committed
    remaining: int | None = None  # records left after the cursor (asked for with count)
    # The office's scope changed: it pulls its whole scope again from cursor 0 (with its
    # own records) and then drops what that did not bring. Such a page has no rows.
    resync: bool = False
    # The newest change to this office's entries in the hub's conflict log (a new one,
    # or an admin's resolution): above the office's own mark, it asks GET /v1/conflicts.
    conflicts: int = 0
    # The hub's identity: another than before means it was restored from a backup.
    epoch: str = ""
    schema_version: int = 0  # the hub's schema version (0: a hub that does not say)

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
            **({"resync": True} if self.resync else {}),
            **({"conflicts": self.conflicts} if self.conflicts else {}),
            **({"epoch": self.epoch} if self.epoch else {}),
            **({"schema_version": self.schema_version} if self.schema_version else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> PullPage:
        """Read a page (parsed JSON, or its bytes); ProtocolError if malformed."""
        return _read(cls, data, "pull page")


# -- an office's own conflicts (GET /v1/conflicts) ----------------------------------


class LostEdit(Struct, frozen=True):
    """An edit of the asking office that lost at the hub (it is the conflict's *other*
    side), or that won but an admin's decision overrode (``side`` kept), the write that
    won, and an admin's decision once there is one.

    ``change`` orders the office's entries by their last change (logged or resolved).
    ``hidden``: the record has left the office's scopes, so the winning value (and a
    value an admin chose) is not sent; the office's own value always is.
    """

    id: int
    change: int
    created_at: str
    table: str
    pk: dict[str, Any]
    kind: str  # field, record, delete or custom
    column: str | None
    value: Any  # the office's value that lost (None: its delete)
    version: str
    status: str  # logged (settled by policy), open (waits for an admin), resolved
    winner_value: Any = None
    winner_office: str | None = None
    winner_version: str | None = None
    hidden: bool = False
    resolved_by: str | None = None
    resolved_at: str | None = None
    resolution: Any = None  # {"keep": "kept" | "other" | "value", "value": ...}
    # other: the office's write lost when the conflict was logged; kept: it won then,
    # and an admin's decision overrode it
    side: str = "other"

    def to_json(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class ConflictPage(Struct, frozen=True, tag_field="protocol", tag=PROTOCOL_VERSION):
    """A page of the asking office's lost edits changed after ``after``, in ``change``
    order; ``cursor`` is the mark to ask from next."""

    conflicts: list[LostEdit]
    cursor: int
    more: bool
    node: str

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "conflicts": [c.to_json() for c in self.conflicts],
            "cursor": self.cursor,
            "more": self.more,
            "node": self.node,
        }

    @classmethod
    def from_json(cls, data: Any) -> ConflictPage:
        """Read a page (parsed JSON, or its bytes); ProtocolError if malformed."""
        return _read(cls, data, "conflict page")


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


# -- small answers (their schemas are published; see hub/openapi.py) -------------------


class Health(Struct, frozen=True):
    """``GET /v1/health``: the hub is up, and its clock."""

    status: Literal["ok"]
    protocol: int
    version: str  # the hub's fieldsync version
    hub_time_ms: int
    # with an office's token: the last change of that office the hub has dealt with
    acked: int | UnsetType = UNSET
    # with an office's token: the office it belongs to (`node set --token` checks it)
    node: str | UnsetType = UNSET
    # The hub's identity: another than before means it was restored from a backup.
    epoch: str = ""
    schema_version: int = 0  # the hub's schema version (0: a hub that does not say)


class SchemaInfo(Struct, frozen=True):
    """``GET /v1/schema``: the hub's schema version and its TOML source."""

    version: int
    source: str


class StatusKept(Struct, frozen=True):
    """The hub's answer to a status report."""

    status: Literal["ok"]
    hub_time_ms: int


class ErrorBody(Struct, frozen=True):
    """Every refusal and failure: a code to act on and a message a person can read."""

    error: str
    detail: str
    hub_time_ms: int | UnsetType = UNSET  # the hub's clock, to correct an office's
    acked: int | UnsetType = UNSET  # how far the hub has committed the office's changes
    diverged_at: int | UnsetType = UNSET  # diverged: the first change number reused


# -- reading -------------------------------------------------------------------------

_T = TypeVar("_T")


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {}


def _read(kind: type[_T], data: Any, what: str) -> _T:
    """``data`` (JSON bytes, or parsed JSON) read as ``kind``.

    ValueError if it is not JSON; ProtocolError, naming the field, if it is not a
    ``kind`` (VersionMismatchError if of another protocol version).
    """
    versioned = _versioned(kind)
    target: Any = kind | _Unversioned if versioned else kind
    try:
        if isinstance(data, bytes):
            decoder = _DECODERS.get(kind) or _DECODERS.setdefault(
                kind, msgspec.json.Decoder(target)
            )
            try:
                found = decoder.decode(data)
            except RecursionError:
                raise ProtocolError(f"{what}: the JSON is nested too deep") from None
        else:
            found = msgspec.convert(data, target)
        if isinstance(found, _Unversioned):
            raise msgspec.ValidationError("no protocol")
    except msgspec.ValidationError as exc:
        if versioned:
            check_version(loads(data) if isinstance(data, bytes) else data, what)
        message, _, where = str(exc).partition(" - at ")
        place = where.strip("`").removeprefix("$").lstrip(".")
        raise ProtocolError(
            f"{what}: {message[:1].lower()}{message[1:]}" + (f" (at {place})" if place else "")
        ) from None
    for row in _rows(found):
        if row.versions is _NO_VERSIONS:
            raise ProtocolError(f"{what}: row {row.seq} has no 'versions'")
    return found  # type: ignore[no-any-return]


def _versioned(kind: type) -> bool:
    """Whether ``kind`` is a message that carries the protocol's version (a Struct
    tagged ``protocol``, as :class:`PushRequest`, :class:`PullPage`...)."""
    config = getattr(kind, "__struct_config__", None)
    return config is not None and config.tag_field == "protocol"


def read_message(kind: type[_T], data: Any, what: str) -> _T:
    """``data`` (JSON bytes, or parsed JSON) read as the wire type ``kind`` (for wire
    types declared in other modules, as shared/reports.py); see :func:`_read`."""
    return _read(kind, data, what)


def _rows(found: object) -> list[PullRow]:
    """The pulled rows in a message read (each has to be checked for its versions)."""
    if isinstance(found, PullRow):
        return [found]
    if isinstance(found, PullPage):
        return found.rows
    if isinstance(found, Rejection):
        return _rows(found.record)
    if isinstance(found, PushResult):
        return [r.record for r in found.rejected if r.record is not None]
    return []
