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
