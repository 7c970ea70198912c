"""``fieldsync hub migrate``: a hub moved from its SQLite file to PostgreSQL (hub/migrate.py)."""

from __future__ import annotations

from pathlib import Path

import click

from shared.errors import FieldsyncError


@click.command("migrate")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="HUB.db",
    type=click.Path(dir_okay=False),
    help="The SQLite hub file to move (stop the hub first).",
)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="URL",
    help="An empty PostgreSQL database: postgresql://USER@HOST/DBNAME.",
)
def hub_migrate(source: str, target: str) -> None:
    """Move a hub from its SQLite file to a PostgreSQL database, checked.

    Everything is copied as it is (records, history, conflicts, tokens, cursors, the
    hub's identity), in one transaction, and compared before it commits. Offices
    sync on without being set up again. The file is then marked as moved: hub
    commands refuse it and name the new database.
    """
    from hub.engine import is_url
    from hub.migrate import migrate

    if not is_url(target):
        raise FieldsyncError(f"--to takes a postgresql:// URL, not {target!r}")
    for line in migrate(Path(source), target).lines():
        click.echo(line)
