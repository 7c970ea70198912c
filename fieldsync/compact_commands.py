"""
``fieldsync hub compact`` and ``fieldsync node compact``: keeping databases small.

See hub/compact.py (tombstones, exits, record history, the purge horizon) and
node/compact.py (versions of records deleted at an office).
"""

from __future__ import annotations

import re

import click

from fieldsync.options import echo_json, hub_db, node_db, open_hub
from shared.errors import FieldsyncError

KEEP_HELP = (
    "Record history to keep: days (180d) or versions per record (5); the latest "
    "version of every record is always kept. [default: 365d]"
)
TOMBSTONE_HELP = (
    "Purge a deleted record after this many days even if an office has not pulled its "
    "delete; that office pulls its whole scope again (0d: purge every deleted record "
    "now). [default: 90d]"
)


def parse_days(text: str, option: str, least: int = 1) -> int:
    """A number of days (at least ``least``), written ``90d`` or ``90``."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*d?\s*", text)
    if found is None or int(found[1]) < least:
        raise FieldsyncError(
            f"{option} takes a number of days such as 90d (at least {least}), not {text!r}"
        )
    return int(found[1])


@click.command("compact")
@hub_db
@click.option("--keep-history", "keep_text", metavar="AGE|N", help=KEEP_HELP)
@click.option("--tombstone-age", "tombstone_text", metavar="DAYS", help=TOMBSTONE_HELP)
@click.option(
    "--vacuum",
    is_flag=True,
    help="Give the freed space back to the disk (VACUUM: pushes wait while it runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_compact(
    db_path: str,
    keep_text: str | None,
    tombstone_text: str | None,
    vacuum: bool,
    as_json: bool,
) -> None:
    """Purge deleted records every office has pulled, and history past --keep-history.

    Works while the hub serves (short write transactions). Prints what it removed,
    the offices marked to pull their whole scope again, and the file's size.
    """
    from hub.compact import DEFAULT_TOMBSTONE_DAYS, Keep, compact, parse_keep

    keep = parse_keep(keep_text) if keep_text is not None else Keep()
    days = (
        parse_days(tombstone_text, "--tombstone-age", least=0)
        if tombstone_text is not None
        else DEFAULT_TOMBSTONE_DAYS
    )
    with open_hub(db_path) as store:
        done = compact(store.database, keep=keep, tombstone_days=days, vacuum=vacuum)
    if as_json:
        echo_json({**done.to_json(), "keep_history": str(keep), "tombstone_days": days})
        return
    click.echo(f"History kept: {keep}; tombstones purged after {days} days at most.")
    click.echo(f"Purged {done.tombstones} deleted record(s) (tombstones).")
    click.echo(f"Purged {done.exits} exit(s) (records that left a scope).")
    click.echo(f"Removed {done.versions} history version(s).")
    offices = ", ".join(done.resync) or "none"
    click.echo(f"Offices that will pull their whole scope again: {offices}.")
    click.echo(
        f"Freed {done.bytes_freed:,} bytes in the file; file size {done.bytes_before:,} -> "
        f"{done.bytes_after:,} bytes{' (vacuumed)' if done.vacuumed else ''}."
    )
    click.echo(f"Longest write lock: {done.longest_lock_ms:.0f} ms; took {done.seconds:.1f} s.")


@click.command("compact")
@node_db
@click.option(
    "--deleted-age",
    "days_text",
    metavar="DAYS",
    help="Drop the versions of records deleted here this long ago. [default: 90d]",
)
@click.option("--vacuum", is_flag=True, help="Give the freed space back to the disk.")
def node_compact(db_path: str, days_text: str | None, vacuum: bool) -> None:
    """Drop what the office no longer needs: versions of records deleted long ago."""
    from node.compact import DEFAULT_DELETED_DAYS, compact_node
    from node.store import NodeStore

    days = parse_days(days_text, "--deleted-age") if days_text else DEFAULT_DELETED_DAYS
    with NodeStore(db_path) as store:
        done = compact_node(store.db, store.schema, store.path, days=days, vacuum=vacuum)
    click.echo(
        f"Dropped the versions of {done.versions} record(s) deleted here over {days} days ago."
    )
    click.echo(f"File size {done.bytes_before:,} -> {done.bytes_after:,} bytes.")
