"""
``fieldsync node conflicts|rejected|retry|drop-change``: what the hub refused or
overruled of an office's edits, read from the office database (offline too), and
what the clerk can do about it.

The office's modules are imported inside command bodies, as in node_commands.py.
"""

from __future__ import annotations

import json
from typing import Any

import click

from fieldsync.options import echo_json, node_db
from shared.errors import FieldsyncError


@click.command("conflicts")
@node_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON (values included).")
def node_conflicts(db_path: str, as_json: bool) -> None:
    """List this office's edits that lost at the hub: what won, and an admin's decision.

    Learned by `node sync` / `node run`; shown offline from the office database."""
    from node.store import NodeStore

    with NodeStore(db_path) as store:
        lost = store.lost_edits()
    if as_json:
        echo_json(lost)
        return
    if not lost:
        click.echo("No edits of this office lost at the hub.")
        return
    for entry in lost:
        click.echo(_lost_edit(entry))


def _said(value: Any, deleted: str, record: str, verb: str = "") -> str:
    """A conflict's value in words: a delete (None), a whole record, or one value."""
    if value is None:
        return deleted
    if isinstance(value, dict):
        return record
    return f"{verb} {json.dumps(value, ensure_ascii=False)}".strip()


def _lost_edit(entry: dict[str, Any]) -> str:
    """One lost edit in words: what the office wrote, what won, and what became of it."""
    key = ", ".join(f"{k}={v}" for k, v in entry["pk"].items())
    where = f"{entry['table']} {key}" + (f" {entry['column']}" if entry["column"] else "")
    mine = _said(entry["your_value"], "deleted it", "its version of the record", "wrote")
    by = entry["winning_office"] or "the hub"
    if entry["hidden"]:
        won = f"a value of {by}'s (not shown: the record is no longer in this office's scope)"
    else:
        won = _said(entry["winning_value"], f"{by}'s delete", f"{by}'s version of the record")
        won = won if isinstance(entry["winning_value"], dict | None) else f"{won}, by {by}"
    line = (
        f"{entry['id']}: {where}: this office {mine} at {entry['your_time']}; "
        f"the hub kept {won} at {entry['winning_time']}"
    )
    if entry["overridden"]:  # this office's edit won, then an admin chose otherwise
        chosen = _said(entry["winning_value"], "the delete", "the other version of the record")
        if entry["hidden"]:
            chosen = "a value not shown (the record is no longer in this office's scope)"
        elif entry["winning_office"]:
            chosen = f"{entry['winning_office']}'s {chosen}"
        return (
            f"{entry['id']}: {where}: this office {mine} at {entry['your_time']} and it "
            f"won, until {entry['resolved_by']} chose {chosen} at {entry['resolved_at']}"
        )
    if entry["status"] == "resolved":
        keep = (entry["resolution"] or {}).get("keep")
        decided = {
            "kept": "kept the winner",
            "other": "restored this office's edit",
            "value": "chose another value",
        }.get(str(keep), "decided")
        return f"{line}; resolved by {entry['resolved_by']} at {entry['resolved_at']}: {decided}"
    if entry["status"] == "open":
        return f"{line}; awaiting an admin's decision"
    return f"{line}; settled by the merge rule"


@click.command("rejected")
@node_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON (values included).")
def node_rejected(db_path: str, as_json: bool) -> None:
    """List the changes the hub rejected: kept here, with the hub's reason."""
    from node.store import NodeStore

    with NodeStore(db_path) as store:
        rejected = store.rejected()
    if as_json:
        echo_json(rejected)
        return
    if not rejected:
        click.echo("No rejected changes.")
        return
    for entry in rejected:
        key = ", ".join(f"{k}={v}" for k, v in entry["pk"].items())
        click.echo(
            f"{entry['seq']}: {entry['op']} {entry['table']} {key}, made {entry['made_at']}, "
            f"rejected {entry['rejected_at']}: {entry['reason']}"
        )
    click.echo(
        "Fix the cause, then `fieldsync node retry NODE.db SEQ` writes the change again; "
        "`fieldsync node drop-change NODE.db SEQ` forgets it.",
        err=True,
    )


@click.command("retry")
@node_db
@click.argument("seq", type=click.IntRange(1, 2**63 - 1))
def node_retry(db_path: str, seq: int) -> None:
    """Write rejected change SEQ again as a new change (once its cause is fixed)."""
    from node.store import NodeStore

    with NodeStore(db_path) as store:
        store.retry_rejected(seq)
    click.echo(f"Change {seq} is written again and queued; it is sent on the next sync.")


@click.command("drop-change")
@node_db
@click.argument("seq", type=click.IntRange(1, 2**63 - 1))
def node_drop_change(db_path: str, seq: int) -> None:
    """Discard queued change SEQ that can never be pushed (fieldsync names it when so),
    or rejected change SEQ (see `node rejected`).

    A queued change's record is queued again as it is now, whole, so fix it first.
    """
    from filelock import FileLock, Timeout

    from node.store import NodeStore

    store = NodeStore(db_path)
    try:
        with FileLock(f"{store.path}-sync.lock", timeout=0):
            queued = store.drop_change(seq)
    except Timeout:
        raise FieldsyncError(f"a sync of {db_path} is running; try again when it ends") from None
    finally:
        store.close()
    if queued:
        click.echo(f"Dropped change {seq}; the record is queued again as it is now.")
    else:
        click.echo(f"Forgot rejected change {seq}.")
