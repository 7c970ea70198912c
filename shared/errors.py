"""
The exceptions fieldsync raises, as a tree:

FieldsyncError
  ├ StoreError               local database problem (schema, disk full, locked)
  ├ SchemaError              a schema file or table declaration that cannot be used
  ├ ProtocolError            malformed message
  │   ├ VersionMismatchError
  │   └ InvalidChangeError   a change names an unknown table/column or has a wrong type
  └ HubError
      ├ HubUnavailableError  network failure, timeout, 5xx: retried next run
      └ HubRejectedError     4xx: retrying will not help until something is fixed
          ├ AuthError          the token is wrong or revoked (401/403)
          ├ ClockSkewError     the office's clock is far ahead of the hub's
          └ DivergedError      the office database was restored from an older copy
"""

from __future__ import annotations

from typing import Any


class FieldsyncError(Exception):
    """Base class of every error fieldsync raises on purpose."""


class StoreError(FieldsyncError):
    """A local database problem: schema, disk full, locked."""


class SchemaError(FieldsyncError):
    """A schema file or table declaration that cannot be used."""


class ProtocolError(FieldsyncError):
    """A message that does not follow the wire protocol."""

    code = "bad_request"


class VersionMismatchError(ProtocolError):
    """The peer speaks another protocol version."""

    code = "version_mismatch"


class InvalidChangeError(ProtocolError):
    """A change names an unknown table or column, or carries a value of the wrong type."""

    code = "invalid_change"


class HubError(FieldsyncError):
    """The hub could not be reached or refused the request."""


class HubUnavailableError(HubError):
    """Network failure, timeout or 5xx answer: worth retrying later."""


class HubRejectedError(HubError):
    """A 4xx answer: retrying will not help until something is fixed."""

    def __init__(
        self,
        message: str,
        code: str = "rejected",
        status: int = 400,
        hub_time_ms: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.hub_time_ms = hub_time_ms  # the hub's clock when it refused, if it said
        self.details = details or {}  # more fields of the JSON error, such as "acked"


class AuthError(HubRejectedError):
    """The token is unknown, revoked or not allowed to do this."""


class ClockSkewError(HubRejectedError):
    """The office's clock is so far ahead of the hub's that its stamps were refused."""


class DivergedError(HubRejectedError):
    """The office reuses change numbers the hub committed for other changes."""


# What an admin can do about each kind of failure an office reports, by error code.
ADVICE: dict[str, str] = {
    "hub_unavailable": "The office could not reach the hub. Check its network link and that "
    "the hub is up; its changes are kept and sent once the link is back.",
    "unauthorized": "The hub does not accept the office's token (revoked or mistyped). Give "
    "the office a valid token: `fieldsync node set DB --token TOKEN`.",
    "forbidden": "The office's database and token do not match. Use the token made for "
    "this office.",
    "clock_skew": "The office computer's clock is far ahead of the hub's. Set its date and "
    "time right; its changes stay queued until then.",
    "diverged": "The office database was restored from an older copy. fieldsync renumbers "
    "its new work by itself; if this repeats, two copies may sync with one token.",
    "too_large": "A change is larger than the hub accepts in one request. Raise the hub's "
    "--max-body-bytes, or drop the change at the office (`node drop-change`).",
    "version_mismatch": "The office and the hub run fieldsync versions that cannot talk. "
    "Upgrade the older one.",
    "invalid_change": "The hub refused the office's changes as malformed. Upgrade the "
    "office's fieldsync, or check its schema matches the hub's.",
    "bad_request": "The hub refused a malformed request. Upgrade the office's fieldsync.",
    "upgrade_required": "The hub holds only some records for each office (sync scopes), "
    "which this office's fieldsync cannot do. Upgrade fieldsync at the office; its changes "
    "stay queued until then.",
    "local_database": "The office's own database failed (disk full, locked or damaged). "
    "Check the disk, then run `PRAGMA integrity_check` on it.",
    "stalled": "Changes wait at the office but none reach the hub. Check that its sync "
    "agent runs (`fieldsync node run`) and look at its last errors.",
    "stale": "No successful sync for a while. Check that the office's sync agent runs "
    "and that its network link works.",
}


def error_code(exc: BaseException) -> str:
    """The code an error is reported to the hub under (a key of :data:`ADVICE`)."""
    if isinstance(exc, HubUnavailableError):
        return "hub_unavailable"
    if isinstance(exc, StoreError):
        return "local_database"
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else "error"


def advice(code: str | None) -> str | None:
    """What to do about an error code, or None when there is nothing specific."""
    return ADVICE.get(code or "")
