"""
``fieldsync hub schema show`` and ``fieldsync hub schema apply``: the hub's schema and
its versions (hub/schemas.py; README: "Changing the schema").
"""

from __future__ import annotations

from typing import Any

import click

from fieldsync.options import Group, echo_json, hub_db, open_hub


@click.group("schema", cls=Group)
def hub_schema() -> None:
    """The hub's schema: show it, or apply a new version while offices work."""


@hub_schema.command("show")
@hub_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schema_show(db_path: str, as_json: bool) -> None:
    """Show the schema's version, tables, columns, policies, scopes and indexes, and
    any column a table has that the schema does not declare (added by hand)."""
    from hub import schemas

    with open_hub(db_path) as store:
        version = store.schema_version
        with store.database.read() as conn:
            extra = schemas.undeclared(conn, store.schema)
        found = describe(store.schema, version, extra)
        found["versions"] = schemas.versions(store.database)
    if as_json:
        echo_json(found)
        return
    click.echo(f"schema version {found['version']}")
    for name, table in found["tables"].items():
        scope = table["scope"] or "every office"
        click.echo(f"{name}  (policy {table['policy']}; held by {scope})")
        for column in table["columns"]:
            key = "  key" if column["key"] else ""
            required = "  NOT NULL" if column["notnull"] else ""
            click.echo(f"  {column['name']}  {column['type'] or '(no type)'}{required}{key}")
        for index in table["indexes"]:
            click.echo(f"  index {index}")
    for table, column in extra:
        click.echo(
            f"not declared: {table}.{column} (added by hand: add it to the schema with "
            "`hub schema apply`, or drop it)"
        )


def describe(schema: Any, version: int, extra: list[tuple[str, str]]) -> dict[str, Any]:
    """What `schema show --json` prints."""
    return {
        "version": version,
        "tables": {
            t.name: {
                "policy": t.policy,
                "scope": t.scope.describe() if t.scope else None,
                "columns": [
                    {
                        "name": c.name,
                        "type": c.type,
                        "notnull": c.notnull,
                        "key": c.name in t.primary_key,
                    }
                    for c in t.columns
                ],
                "indexes": [name for name, _ in t.indexes],
            }
            for t in schema.tables.values()
        },
        "undeclared": [f"{table}.{column}" for table, column in extra],
    }


@hub_schema.command("apply")
@click.argument("schema_file", type=click.Path(exists=True, dir_okay=False))
@hub_db
@click.option(
    "--allow-loss",
    is_flag=True,
    help="Go ahead with a change that may lose data (a dropped column, a narrower "
    "type or CHECK); the hub is backed up first (SQLite: a copy of its file; "
    "PostgreSQL: a copy of each table that loses data, as a table beside it).",
)
def schema_apply(schema_file: str, db_path: str, allow_loss: bool) -> None:
    """Make SCHEMA_FILE the hub's schema, as its next version (works while the hub
    serves). Offices take it at their next sync. Additive changes only, unless
    --allow-loss."""
    from hub import schemas
    from hub.audit import Actor
    from shared.schema import Schema

    new = Schema.load(schema_file)
    with open_hub(db_path) as store:
        done = schemas.apply(store.database, new, Actor.cli(), allow_loss=allow_loss)
    if done.plan is None:
        click.echo(f"The hub is already at version {done.version} of this schema.")
        return
    if done.backup is not None:
        click.echo(f"Backed up the hub to {done.backup} first.")
    for name in done.backup_tables:
        click.echo(
            f"Kept the rows from before in table {name} (drop it when no longer needed: "
            f'DROP TABLE "{name}";).'
        )
    for line in done.plan.lines():
        click.echo(f"  {line}")
    click.echo(f"Schema version {done.version} applied; offices take it at their next sync.")
