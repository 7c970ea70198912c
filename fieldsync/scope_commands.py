"""
``fieldsync hub scope …`` and ``fieldsync hub move …``: which records each office holds.

See hub/scopes.py for the model: records belong to scope keys (office names); each
office holds the keys it is given (its own name unless told otherwise).
"""

from __future__ import annotations

import click

from fieldsync.options import echo_json, hub_db, open_hub


def _show(keys: list[str] | frozenset[str] | None) -> str:
    if keys is None:
        return "every record (*)"
    return ", ".join(sorted(repr(k) if k == "" else k for k in keys))


@click.command("scope")
@click.argument("name", required=False)
@click.argument("keys", nargs=-1)
@hub_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_scope(name: str | None, keys: tuple[str, ...], db_path: str, as_json: bool) -> None:
    """Show each office's scopes, or give office NAME the scopes KEYS.

    A key is an office name: the office holds the records that belong to it (cases
    whose office column names it, and what follows them). `*` holds every record,
    for headquarters. The office pulls its new scope on its next sync, and drops
    what falls out of it.
    """
    with open_hub(db_path) as store:
        if keys:
            assert name is not None
            given = store.set_scopes(name, keys)
            click.echo(f"Office {name} now holds {_show(given)}; it pulls that on its next sync.")
            return
        found = store.scopes()
    if name is not None:
        if name not in found:
            raise click.ClickException(f"no office named {name!r} is registered")
        found = {name: found[name]}
    if as_json:
        echo_json(found)
        return
    for office, held in found.items():
        click.echo(f"{office}: {_show(held)}")


@click.command("move")
@click.argument("table")
@click.argument("key", nargs=-1, required=True)
@click.option("--to", "to", required=True, help="The office the record moves to.")
@hub_db
@click.option("--by", default="admin", show_default=True, help="Who moves it (recorded).")
def hub_move(table: str, key: tuple[str, ...], to: str, db_path: str, by: str) -> None:
    """Move a record (a case, with what follows it) to another office.

    KEY is the record's primary key (each part, for a key of several columns). The
    office it moves to receives it on its next sync; the office that held it drops
    its copy on its next sync.
    """
    with open_hub(db_path) as store:
        seq = store.move(table, list(key), to, by)
    click.echo(
        f"Moved the {table} record to {to} (hub seq {seq}); offices see it on their next sync."
    )
