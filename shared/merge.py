"""
The merge rule: how the hub applies one change to the current state of a record.

Every column carries a version: the stamp (text form of a ``Timestamp``) of the write
that set its current value. The pseudo-column ``~`` versions the record's existence
(deletes and re-inserts). A change names, per column, the version its office had
when the write was made (its *base*).

For each column the change sets:

- base equals the current version: the office had seen the current value, so the
  write simply applies;
- otherwise the write is concurrent with another office's, and the table's policy
  decides:

  ========  ===============================  =====================================
  policy    different fields                 same field
  ========  ===============================  =====================================
  merge     both kept                        greater stamp wins (node name breaks
                                             ties); the loser is logged
  record    the whole later record wins      the same; the losing record is logged
  manual    both kept                        the hub keeps its value; the other
                                             waits in the log as an open conflict
  custom    both kept                        a Python function named in the schema
                                             returns the merged record; the incoming
                                             values are logged
  ========  ===============================  =====================================

Deletes are tombstones: the record's last values and versions are kept, marked
deleted. A delete applies only if its office had seen every column's current version
(a delete made after seeing an update wins). Otherwise the record stays, with the
update, and the delete is logged as a conflict: losing a refugee's record by accident
is worse than a stale delete. An insert or update that reaches a deleted record
brings it back; if its office had not seen the delete, the delete is logged too.

The hub is the only place that runs this function, so every office converges on the
hub's decisions, whatever the policy. It is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.clock import Timestamp
from shared.protocol import Change
from shared.schema import EXISTS, Versions


@dataclass(slots=True)
class RecordState:
    """The hub's current state of one record (values kept even when deleted)."""

    values: dict[str, Any] = field(default_factory=dict)
    versions: Versions = field(default_factory=dict)
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two concurrent writes to one record; ``kept`` is what the hub holds now.

    ``column`` is None for whole-record conflicts (kind ``record`` or ``delete``),
    whose values are whole records (or None for the delete side). For kind
    ``custom``, ``kept`` is the hub's side before the merge, ``other`` the incoming
    side, and ``merged`` what the custom function chose.
    """

    kind: str  # field, record, delete or custom
    column: str | None
    kept_value: Any
    kept_version: str | None
    other_value: Any
    other_version: str
    open: bool  # True when it waits for an admin (manual policy)
    merged: Any = None


@dataclass(slots=True)
class Outcome:
    """What applying one change did."""

    state: RecordState
    conflicts: list[Conflict]
    changed: bool  # the record's values, versions or existence changed
    exact: bool  # the office had seen the whole record and got all it asked for


def effect(
    versions: Mapping[str, str], op: str, values: Mapping[str, Any] | None, ts: str
) -> Versions:
    """The versions of a record once the hub has applied a change to it exactly.

    ``versions`` are the record's versions before the change, ``op``, ``values`` and
    ``ts`` (its stamp, as text) the change's. Each column the change sets takes its
    stamp; a delete, or the re-insert of a record that was deleted before, versions
    the record's existence (``~``) too.

    This is what :func:`merge` gives when the office had seen the record as the hub
    holds it (``exact``): an office works out with it the base of its next change
    to the same record, and the versions it keeps once the hub acknowledges the
    change, without waiting to pull it back. It is pure; ``versions`` is not changed.
    """
    after = dict(versions)
    if values is not None:
        for col in values:  # a loop: faster than dict.fromkeys() for the few columns of an edit
            after[col] = ts
    if op == "delete" or (op == "insert" and EXISTS in after):
        after[EXISTS] = ts
    return after


def _node_of(version: str | None) -> str:
    return Timestamp.parse(version).node if version else ""


@dataclass(frozen=True, slots=True)
class MergeRequest:
    """What a custom merge function is given when two offices edited a field concurrently."""

    table: str
    current: dict[str, Any]  # the record as the hub holds it
    incoming: dict[str, Any]  # the columns the incoming change sets
    columns: tuple[str, ...]  # the columns both sides changed to different values
    office: str  # the office the incoming change comes from


CustomMerge = Callable[[MergeRequest], dict[str, Any]]


def merge(
    current: RecordState | None,
    change: Change,
    policy: str = "merge",
    custom: CustomMerge | None = None,
    *,
    stamp: str | None = None,
    decided_stamp: str | None = None,
) -> Outcome:
    """Apply ``change`` to ``current`` (None if the hub has never seen the record).

    ``custom`` is the function of a ``custom:`` policy; it decides the record when
    the change is concurrent with another office's edit of the same field.
    ``stamp``: ``str(change.ts)``, if the caller has it already.
    ``decided_stamp``: the version of a value the custom function decides other than
    the incoming one: a stamp later than the change's that no office holds (the hub
    issues it), so that both offices take the decided value back. Without it, the
    change's own stamp, which its office already holds with its own value.
    """
    ts = stamp if stamp is not None else str(change.ts)
    if current is None:
        if change.values is None:
            state = RecordState({}, {EXISTS: ts}, deleted=True)
            return Outcome(state, [], changed=True, exact=not change.base)
        state = RecordState(dict(change.values), dict.fromkeys(change.values, ts))
        return Outcome(state, [], changed=True, exact=not change.base)

    state = RecordState(dict(current.values), dict(current.versions), current.deleted)
    saw_all = all(change.base.get(col) == ver for col, ver in current.versions.items())
    if change.values is None:
        return _delete(state, change, ts, saw_all, policy)

    conflicts: list[Conflict] = []
    changed = False
    lost_delete: str | None = None
    revived = state.deleted
    if state.deleted:
        # Bring the record back; the delete loses unless this office had seen it.
        if change.base.get(EXISTS) != state.versions.get(EXISTS):
            lost_delete = state.versions[EXISTS]
        state.deleted = False
        state.versions[EXISTS] = ts
        changed = True
    elif change.op == "insert" and EXISTS in state.versions:
        # A re-insert versions the record's existence, as the office's copy does.
        state.versions[EXISTS] = ts
        changed = True

    # A change that brings a deleted record back wins over the delete, in every policy.
    if policy == "record" and not saw_all and not revived:
        latest = max(current.versions.values(), default="")
        if ts > latest:
            conflicts.append(
                Conflict(
                    "record",
                    None,
                    dict(change.values),
                    ts,
                    dict(current.values),
                    latest,
                    open=False,
                )
            )
            for col, value in change.values.items():
                state.values[col] = value
                state.versions[col] = ts
            changed = True
        else:
            conflicts.append(
                Conflict(
                    "record",
                    None,
                    dict(current.values),
                    latest,
                    dict(change.values),
                    ts,
                    open=False,
                )
            )
        return Outcome(
            state, _with_delete(conflicts, lost_delete, state, ts, policy), changed, exact=False
        )

    decided: dict[str, Any] = {}
    if custom is not None:
        clashing = tuple(
            col
            for col, value in change.values.items()
            if change.base.get(col) != state.versions.get(col)
            and state.versions.get(col) is not None
            and state.values.get(col) != value
        )
        if clashing:
            request = MergeRequest(
                change.table, dict(state.values), dict(change.values), clashing, change.ts.node
            )
            merged = custom(request)
            if not isinstance(merged, dict):
                raise TypeError(f"returned {type(merged).__name__}, not a dict")
            # The function decides the clashing columns; the others follow the rule.
            decided = {col: merged.get(col, state.values.get(col)) for col in clashing}

    for col, value in change.values.items():
        have = state.versions.get(col)
        if col in decided:
            conflicts.append(
                Conflict("custom", col, state.values.get(col), have, value, ts, False, decided[col])
            )
            state.values[col] = decided[col]
            if decided[col] == value or decided_stamp is None:
                state.versions[col] = ts
            else:
                state.versions[col] = decided_stamp
            changed = True
            continue
        if change.base.get(col) == have or have is None:
            if state.values.get(col) != value or have != ts:
                state.values[col] = value
                state.versions[col] = ts
                changed = True
            continue
        old = state.values.get(col)
        if old == value:
            # Both offices wrote the same value: nothing to choose between.
            if ts > have:
                state.versions[col] = ts
                changed = True
            continue
        if policy == "manual":
            conflicts.append(Conflict("field", col, old, have, value, ts, open=True))
        elif ts > have:
            conflicts.append(Conflict("field", col, value, ts, old, have, open=False))
            state.values[col] = value
            state.versions[col] = ts
            changed = True
        else:
            conflicts.append(Conflict("field", col, old, have, value, ts, open=False))
    conflicts = _with_delete(conflicts, lost_delete, state, ts, policy)
    return Outcome(state, conflicts, changed, exact=saw_all and not conflicts)


def _with_delete(
    conflicts: list[Conflict], delete_version: str | None, state: RecordState, ts: str, policy: str
) -> list[Conflict]:
    """Prepend the conflict of a delete that lost to ``ts``, holding the record kept."""
    if delete_version is None:
        return conflicts
    kept = Conflict(
        "delete", None, dict(state.values), ts, None, delete_version, open=policy == "manual"
    )
    return [kept, *conflicts]


def _delete(state: RecordState, change: Change, ts: str, saw_all: bool, policy: str) -> Outcome:
    if state.deleted:
        return Outcome(state, [], changed=False, exact=False)
    if saw_all:
        state.deleted = True
        state.versions[EXISTS] = ts
        return Outcome(state, [], changed=True, exact=True)
    latest = max(state.versions.values(), default=None)
    conflict = Conflict(
        "delete", None, dict(state.values), latest, None, ts, open=policy == "manual"
    )
    return Outcome(state, [conflict], changed=False, exact=False)


def node_of(version: str | None) -> str:
    """The node name inside a version string ('' for None)."""
    return _node_of(version)


# -- an admin's resolution of a logged conflict -------------------------------------------

KEEPS = ("kept", "other", "value")


@dataclass(slots=True)
class Resolution:
    """What settling a conflict does to its record."""

    state: RecordState
    chosen: dict[str, Any]  # the columns the decision sets (empty: none)
    changed: bool  # the record's values, versions or existence changed


def resolution_writes(kind: str, keep: str) -> bool:
    """Does keeping ``keep`` of a conflict of ``kind`` write to the record?

    Keeping the side the hub holds changes nothing, except for kind ``custom``, where
    the hub holds what the custom function chose rather than the kept side.
    """
    return keep != "kept" or kind == "custom"


def resolve(
    current: RecordState,
    *,
    kind: str,
    column: str | None,
    kept_value: Any,
    other_value: Any,
    keep: str,
    value: Any = None,
    stamp: str,
) -> Resolution:
    """Settle a conflict of ``kind`` about ``column`` (None: the whole record).

    ``keep`` is ``kept`` (the hub's side when it was logged), ``other`` (the side that
    lost) or ``value`` (``value``, typed by the admin; a field's conflict only).
    ``stamp`` is a fresh stamp the hub issues: every column the decision sets gets it,
    so the decision reaches every office as a change later than both sides. Keeping
    the other side of a lost delete deletes the record; setting a value on a deleted
    record brings it back.
    """
    if keep not in KEEPS:
        raise ValueError(f"keep must be 'kept', 'other' or 'value', not {keep!r}")
    if keep == "value" and column is None:
        raise ValueError("a value settles a field's conflict, not a whole record's")
    state = RecordState(dict(current.values), dict(current.versions), current.deleted)
    chosen: dict[str, Any] = {}
    if column is not None and resolution_writes(kind, keep):
        sides = {"value": value, "other": other_value, "kept": kept_value}
        chosen = {column: sides[keep]}
    elif keep == "other" and isinstance(other_value, dict):
        chosen = dict(other_value)  # a whole record
    elif keep == "other" and kind == "delete":
        state.deleted = True
        state.versions[EXISTS] = stamp
    for col, val in chosen.items():
        state.values[col] = val
        state.versions[col] = stamp
    if chosen and state.deleted:  # writing a value brings the record back
        state.deleted = False
        state.versions[EXISTS] = stamp
    return Resolution(state, chosen, changed=state != current)
