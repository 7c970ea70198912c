"""
What every ``fieldsync`` command group shares: one-line errors, and common options.

Library code never prints or exits; :class:`Group` turns every FieldsyncError (and bad
values, OS and SQLite errors) into a one-line ``Error: …`` and exit code 1.
``--debug`` on the root command shows tracebacks instead.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from typing import TYPE_CHECKING, Any

import click

from shared.errors import FieldsyncError

if TYPE_CHECKING:
    from hub.store import SqlHubStore
    from shared.schema import Schema


class Group(click.Group):
    """A group whose commands report errors in one line unless --debug is given."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`… | head`): not an error worth a message.
            sys.stderr.close()
            raise SystemExit(0) from None
        except (FieldsyncError, ValueError, OSError, sqlite3.Error) as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(str(exc) or type(exc).__name__) from None
        except Exception as exc:
            # PostgreSQL's own errors (a role without rights, a server gone): its first
            # line, as psycopg words it (not imported here: commands start faster).
            if _debug(ctx) or not type(exc).__module__.startswith("psycopg"):
                raise
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise click.ClickException(f"PostgreSQL: {lines[0]}") from None


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug"))


# The office database a `node` command works on.
hub_db = click.option(
    "--db",
    "db_path",
    required=True,
    metavar="HUB",
    type=click.Path(dir_okay=False),
    help="The hub database: a SQLite file, or a PostgreSQL database as "
    "postgresql://USER@HOST/DBNAME (password in ~/.pgpass or PGPASSWORD).",
)
node_db = click.argument("db_path", metavar="NODE.db", type=click.Path(dir_okay=False))

schema_option = click.option(
    "--schema",
    "schema_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Schema file (TOML) declaring the synced tables; default: case management.",
)


def load_schema(path: str | None) -> Schema | None:
    """The schema in the file at ``path``; None (the default schema) without one."""
    from shared.schema import Schema

    return Schema.load(path) if path else None


def open_hub(
    db_path: str, schema_path: str | None = None, create: bool = False, serving: bool = False
) -> SqlHubStore:
    """The hub store at ``db_path``, a SQLite file's path or a ``postgresql://`` URL
    (made, with the schema, when ``create``); only ``serving`` (`hub serve`) gives a
    backup put in place its new identity."""
    from hub.store import open_store

    return open_store(db_path, load_schema(schema_path), create=create, serving=serving)


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (what every ``--json`` option prints)."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))
