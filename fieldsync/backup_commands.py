"""
``fieldsync hub backup``, ``hub restore`` and ``node backup``: consistent copies made
while the database is in use, checked, 0600 (shared/backup.py), and a hub put back
from one with a new identity (hub/epoch.py), so that offices re-send what it lacks
(node/restore.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from fieldsync.options import hub_db, node_db
from shared.errors import FieldsyncError

_out = click.argument("out", metavar="OUT", type=click.Path(dir_okay=False))
_force = click.option("--force", is_flag=True, help="Replace OUT if it exists.")


@click.command("backup")
@hub_db
@_out
@_force
def hub_backup(db_path: str, out: str, force: bool) -> None:
    """Copy the hub database to OUT while offices sync, and verify the copy.

    The copy is one consistent moment of the hub, readable by its owner only. A hub
    restored from it gets a new identity, and offices re-send what it lacks.
    """
    from hub.epoch import count_hub, mark_backup
    from shared.backup import backup

    _sqlite_only(db_path, "back up", "pg_dump")
    info = backup(Path(db_path), Path(out), count=count_hub, mark=mark_backup, force=force)
    click.echo(info.line())


@click.command("restore")
@click.argument("backup_path", metavar="BACKUP", type=click.Path(dir_okay=False))
@hub_db
def hub_restore(backup_path: str, db_path: str) -> None:
    """Put a backup made by `hub backup` in place of the hub database (stop the hub first).

    The file replaced is kept beside it (HUB.replaced-TIME). When the hub starts it has
    a new identity: each office re-sends the changes the backup lacks that it still
    keeps, then pulls everything again.
    """
    from hub.epoch import count_hub, mark_backup
    from shared.backup import restore

    _sqlite_only(db_path, "restore", "pg_restore")
    info, aside = restore(Path(backup_path), Path(db_path), count=count_hub, mark=mark_backup)
    click.echo(f"restored {info.line()}")
    if aside is not None:
        click.echo(f"The database replaced is kept as {aside}.")
    click.echo(
        "Tokens revoked and audit entries made after the backup was taken are not in it: "
        "revoke or rotate those tokens again.",
        err=True,
    )


def _sqlite_only(db_path: str, verb: str, tool: str) -> None:
    """Refuse a PostgreSQL hub: the server's own tools copy it."""
    from hub.engine import is_url

    if is_url(db_path):
        raise FieldsyncError(
            f"fieldsync cannot {verb} a PostgreSQL hub; use {tool} (the server's own tools)"
        )


@click.command("backup")
@node_db
@_out
@_force
def node_backup(db_path: str, out: str, force: bool) -> None:
    """Copy an office database to OUT while it is in use, and verify the copy."""
    from node.restore import count_office
    from shared.backup import backup

    info = backup(Path(db_path), Path(out), count=count_office, force=force)
    click.echo(info.line())
