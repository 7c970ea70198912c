"""
``fieldsync hub …``: serve the hub and administer it (offices, admins, conflicts,
rejected changes, exports) from the command line.

The hub's modules are imported inside command bodies, so that ``fieldsync node …``
commands load none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from datetime import timedelta
from typing import Any

import click

from fieldsync.options import Group, echo_json, hub_db, open_hub, schema_option
from shared import __version__
from shared.errors import FieldsyncError


@click.group(cls=Group)
def hub() -> None:
    """Run and administer the hub."""


_open_hub = open_hub


_stale_after = click.option(
    "--stale-after",
    type=click.IntRange(1, 10 * 366 * 86400),
    metavar="SECONDS",
    help="An office with no successful sync for this long is stale "
    "[default: 3 of its sync intervals; 3 minutes when it has not said].",
)


def _stale(seconds: int | None) -> timedelta | None:
    return timedelta(seconds=seconds) if seconds else None


@hub.command("serve")
@hub_db
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--max-future-seconds",
    default=300,
    show_default=True,
    type=click.IntRange(1, 10 * 366 * 86400),
    help="Refuse changes stamped further than this ahead of the hub's clock.",
)
@_stale_after
@click.option(
    "--certfile",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve https:// with this certificate (PEM, with its chain); needs --keyfile.",
)
@click.option(
    "--keyfile",
    type=click.Path(exists=True, dir_okay=False),
    help="The private key (PEM) of --certfile.",
)
@click.option(
    "--forwarded-allow-ips",
    metavar="ADDRS",
    help="Behind a reverse proxy: the proxy's addresses (comma-separated; * for any), "
    "whose X-Forwarded-For and X-Forwarded-Proto headers are believed. [default: none]",
)
@click.option(
    "--keep-history",
    "keep_text",
    metavar="AGE|N",
    help="Compacted daily: record history kept, days (180d) or versions per record (5); "
    "deleted records purged once every office pulled them (or after 90 days). "
    "[default: 365d]",
)
@click.option(
    "--compact-after",
    default=300,
    show_default=True,
    type=click.IntRange(1, 86400),
    metavar="SECONDS",
    help="The first compaction runs this long after start, then every day.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes serving the one database (each uses its own connections).",
)
@schema_option
def hub_serve(
    db_path: str,
    host: str,
    port: int,
    max_future_seconds: int,
    stale_after: int | None,
    certfile: str | None,
    keyfile: str | None,
    forwarded_allow_ips: str | None,
    schema_path: str | None,
    keep_text: str | None,
    compact_after: int,
    workers: int,
) -> None:
    """Serve the hub (under uvicorn): the sync API, and the admin dashboard at /.

    Over https:// with --certfile and --keyfile; plain http:// otherwise (for this
    machine, or behind a reverse proxy that serves https://). With --workers N, N
    processes serve the one database (best on PostgreSQL); several machines may
    serve one PostgreSQL database behind a load balancer.
    """
    import uvicorn

    from fieldsync.serving import SETTINGS, Serving, build
    from hub.engine import is_url

    settings = Serving(
        db_path, schema_path, max_future_seconds, stale_after, keep_text, compact_after
    )
    if keep_text is not None:
        from hub.compact import parse_keep

        parse_keep(keep_text)  # a bad value is a one-line error before anything starts
    _check_tls(certfile, keyfile)
    _listen(host, port).close()  # a port in use is a one-line error, before any file
    new = not is_url(db_path) and not os.path.exists(db_path)
    store = _open_hub(db_path, schema_path, create=True, serving=True)
    _check_declared(store)
    if new:
        click.echo(f"Created a new hub database {db_path}; register offices with hub add-node.")
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if certfile else "http"
    many = f" ({workers} workers)" if workers > 1 else ""
    click.echo(
        f"fieldsync hub {__version__}: {store.where} on {scheme}://{shown}:{port}{many}", err=True
    )
    # uvicorn binds the port again (serving on a socket handed to it measured about
    # 8% slower per pushed change). Forwarded headers are believed only from the
    # addresses given (uvicorn's default would trust any local process).
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "info",
        "ssl_certfile": certfile,
        "ssl_keyfile": keyfile,
        "proxy_headers": bool(forwarded_allow_ips),
        "forwarded_allow_ips": forwarded_allow_ips or "",
    }
    if workers > 1:
        store.close()  # each worker opens its own (fieldsync/serving.py)
        os.environ[SETTINGS] = settings.to_env()
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.run("fieldsync.serving:app", factory=True, workers=workers, **options)
        return
    try:
        server = uvicorn.Server(uvicorn.Config(build(settings, store), **options))
    except BaseException:
        store.close()
        raise
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: shut down cleanly, exit 0
        server.run()
    if not server.started:
        store.close()
        raise FieldsyncError(f"the hub did not start on {host}:{port} (see the log above)")


def _check_declared(store: Any) -> None:
    """Refuse to serve a hub whose tables have columns the schema lacks (by hand)."""
    from hub.schemas import check_declared

    try:
        check_declared(store.database)
    except BaseException:
        store.close()
        raise


def _check_tls(certfile: str | None, keyfile: str | None) -> None:
    """A one-line error, before anything starts, for a certificate and key that do not
    make a TLS server (or one given without the other)."""
    if not certfile and not keyfile:
        return
    if not (certfile and keyfile):
        raise click.UsageError("--certfile and --keyfile go together")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise FieldsyncError(f"cannot serve TLS with {certfile} and {keyfile}: {why}") from None


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` as uvicorn binds one: IPv6 for an address
    with a colon, IPv4 otherwise (``localhost`` included)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except (OSError, UnicodeError) as exc:
        listener.close()
        why = getattr(exc, "strerror", None) or exc
        raise FieldsyncError(f"cannot listen on {host}:{port}: {why}") from None
    return listener


@hub.command("add-node")
@click.argument("name")
@hub_db
@schema_option
@click.option(
    "--scope",
    "scope_keys",
    multiple=True,
    metavar="KEY",
    help="An office name whose records this office holds (repeat for several; * for "
    "every record) [default: its own name]. See `fieldsync hub scope`.",
)
def hub_add_node(
    name: str, db_path: str, schema_path: str | None, scope_keys: tuple[str, ...]
) -> None:
    """Register an office; print its token on the last line (keep it secret)."""
    with _open_hub(db_path, schema_path, create=True) as store:
        token = store.add_node(name)
        if scope_keys:
            store.set_scopes(name, scope_keys)
    click.echo(f"Registered office {name!r}. Its token (shown once, stored only as a hash):")
    click.echo(token)


_ROLES = ("viewer", "resolver", "owner")  # hub/auth.py's ROLES (checked by a test)


@hub.command("add-admin")
@click.argument("name")
@hub_db
@click.option(
    "--role",
    type=click.Choice(_ROLES),
    default="viewer",
    show_default=True,
    help="viewer: status and figures; resolver: also settles conflicts; owner: also "
    "downloads case data, reads record histories and the audit log.",
)
def hub_add_admin(name: str, db_path: str, role: str) -> None:
    """Make an admin; print the admin token on the last line (keep it secret).

    The token signs in to the dashboard at the hub's address and is the bearer
    token of the admin API and /metrics. Change the role later with `hub set-role`.
    """
    with _open_hub(db_path, create=True) as store:
        token = store.add_admin(name, role)
    click.echo(f"Made admin {name!r} ({role}). The token (shown once, stored only as a hash):")
    click.echo(token)


@hub.command("status")
@hub_db
@_stale_after
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_status(db_path: str, stale_after: int | None, as_json: bool) -> None:
    """Show how every office syncs: health, last sync, pending, lag, conflicts, errors."""
    from hub.times import ago

    with _open_hub(db_path) as store:
        offices = store.offices(stale_after=_stale(stale_after))
    if as_json:
        echo_json([o.to_json() for o in offices])
        return
    if not offices:
        click.echo("No offices yet; register one with `fieldsync hub add-node NAME`.")
        return
    header = ("OFFICE", "HEALTH", "LAST SYNC", "PENDING", "LAG", "CONFLICTS", "REJECTED")
    rows = [
        (
            o.name,
            o.health,
            ago(o.last_success_at),
            "?" if o.pending is None else str(o.pending),
            str(o.lag),
            str(o.open_conflicts),
            str(o.rejected),
        )
        for o in offices
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        click.echo("  ".join(cells).rstrip())
    for o in offices:
        if o.health != "ok":
            click.echo(f"\n{o.name}: {o.health}: {o.health_reason}")
            if o.advice:
                click.echo(f"  What to do: {o.advice}")


@hub.command("conflicts")
@hub_db
@click.option(
    "--status",
    type=click.Choice(["open", "logged", "resolved", "all"]),
    default="all",
    show_default=True,
    help="open: waiting for an admin; logged: settled by policy; resolved: by an admin.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_conflicts(db_path: str, status: str, as_json: bool) -> None:
    """List the conflict log."""
    with _open_hub(db_path) as store:
        records = store.conflicts(None if status == "all" else status)
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    if not records:
        click.echo("No conflicts.")
        return
    for r in records:
        data = r.to_json()
        what = f"{r.table} {json.dumps(r.pk, ensure_ascii=False)}"
        field = f" field {r.column}" if r.column else ""
        kept = "hub had" if r.kind == "custom" else "kept"
        click.echo(f"#{r.id} [{r.status}] {r.kind} conflict on {what}{field}")
        click.echo(
            f"    {kept + ':':<7}{_show(r.kept_value, r.kind)}  "
            f"({r.kept_node}, {data['kept']['time']})"
        )
        click.echo(
            f"    other: {_show(r.other_value, r.kind)}  ({r.other_node}, {data['other']['time']})"
        )
        if r.kind == "custom":
            click.echo(f"    merged: {_show(r.merged, r.kind)}")
        if r.status == "resolved":
            how = r.resolution.get("keep") if isinstance(r.resolution, dict) else r.resolution
            if how == "value":
                how = f"value {_show(r.resolution.get('value'), r.kind)}"
            click.echo(f"    resolved by {r.resolved_by} at {r.resolved_at}: kept {how}")


@hub.command("rejected")
@hub_db
@click.option("--office", help="Only this office's rejected changes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_rejected(db_path: str, office: str | None, as_json: bool) -> None:
    """List changes the hub rejected (the office keeps their values)."""
    with _open_hub(db_path) as store:
        rejected = store.rejected(office)
    if as_json:
        echo_json(rejected)
        return
    if not rejected:
        click.echo("No rejected changes.")
        return
    for entry in rejected:
        what = f"{entry['table']} {json.dumps(entry['pk'], ensure_ascii=False)}"
        click.echo(
            f"{entry['node']} change {entry['seq']} ({entry['op']} {what}) at "
            f"{entry['created_at']}: {entry['reason']}"
        )


@hub.command("export")
@click.argument("table")
@hub_db
@click.option("--format", "fmt", required=True, metavar="csv|json", help="csv or json.")
@click.option(
    "--office",
    help="Only the records that belong to this office (its scope; the same records "
    "headquarters' figures count for it). Not for a table without a scope.",
)
@click.option(
    "--out",
    "out_path",
    default="-",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="The file to write (replaced only once complete); default or -: standard output.",
)
def hub_export(table: str, db_path: str, fmt: str, office: str | None, out_path: str) -> None:
    """Write the consolidated records of TABLE as CSV or JSON, in key order.

    Reads the hub database read-only, on one snapshot, a chunk of rows at a time (a
    SQLite file or a postgresql:// URL): safe while the hub serves, and fit for
    tables of millions of records.
    """
    from hub.export import export_rows, export_to_path

    if out_path == "-":
        stdout = getattr(sys.stdout, "buffer", sys.stdout)  # UTF-8 bytes, whatever the locale
        count = export_rows(db_path, table, fmt.lower(), stdout, office)
        stdout.flush()
    else:
        count = export_to_path(db_path, table, fmt.lower(), out_path, office)
        click.echo(
            f"Exported {count} row{'' if count == 1 else 's'} of {table} to {out_path}", err=True
        )
    _audit_export(db_path, table, fmt.lower(), office, out_path, count)


def _audit_export(
    db_path: str, table: str, fmt: str, office: str | None, out_path: str, count: int
) -> None:
    """Record a finished export in the audit log (names and a count, never values)."""
    from hub.audit import Actor

    with _open_hub(db_path) as store:
        what = {"format": fmt, "office": office, "out": out_path, "rows": count}
        store.audit("export", Actor.cli(), table, table=table, **what)


def _show(value: Any, kind: str) -> str:
    if kind == "delete" and value is None:
        return "(delete)"
    return json.dumps(value, ensure_ascii=False)


@hub.command("resolve")
@click.argument("conflict_id", type=click.IntRange(1, 2**63 - 1))
@hub_db
@click.option(
    "--keep",
    required=True,
    help="kept (the value the hub holds), other (the value that lost), an office name, "
    "or 'value' together with --value.",
)
@click.option(
    "--value",
    "value",
    help="With --keep value: the value to write: text, a number, null, or a JSON "
    "string ('\"null\"' is the text null).",
)
@click.option("--by", default="admin", show_default=True, help="Who decides (recorded).")
@click.option("--force", is_flag=True, help="Apply even if the record changed since the conflict.")
def hub_resolve(
    conflict_id: int, db_path: str, keep: str, value: str | None, by: str, force: bool
) -> None:
    """Settle a conflict; the decision reaches every office on its next sync."""
    from hub.admin import audit_resolution
    from hub.audit import Actor

    with _open_hub(db_path) as store:
        record = store.conflict(conflict_id)
        side = keep
        if keep not in ("kept", "other", "value"):
            if keep == record.kept_node:
                side = "kept"
            elif keep == record.other_node:
                side = "other"
            else:
                raise click.ClickException(
                    f"use kept, other, value, {record.kept_node} or {record.other_node}"
                )
        parsed: Any = None
        if side == "value":
            if value is None:
                raise click.ClickException("--keep value needs --value")
            if record.column is None:
                raise click.ClickException(
                    f"conflict {record.id} is about a whole record; use --keep kept or --keep other"
                )
            parsed = store.schema.table(record.table).parse_value(record.column, value)
        elif value is not None:
            raise click.ClickException("--value goes with --keep value")
        done = store.resolve(conflict_id, side, by, parsed, force=force)
        audit_resolution(store, Actor.cli(), done)
    click.echo(
        f"Conflict {done.id} resolved ({side}); offices get the decision on their next sync."
    )


# -- taking keys back, roles, the audit log ---------------------------------------------

_kind = click.option(
    "--office",
    "kind",
    flag_value="office",
    help="NAME is an office (needed only when an admin has the same name).",
)
_kind_admin = click.option(
    "--admin",
    "kind",
    flag_value="admin",
    help="NAME is an admin (needed only when an office has the same name).",
)


@hub.command("revoke")
@click.argument("name")
@hub_db
@_kind
@_kind_admin
def hub_revoke(name: str, db_path: str, kind: str | None) -> None:
    """Revoke the token of office or admin NAME, at once, even on a running hub.

    The office's next sync is refused (401 revoked) and its changes wait at the office
    until `hub rotate-token` gives it a new token; an admin's dashboard sessions end.
    Revoking twice changes nothing more; each time is recorded in the audit log.
    """
    with _open_hub(db_path) as store:
        kind, already = store.revoke(name, kind)
    if already:
        click.echo(f"The token of {kind} {name!r} was already revoked.")
    else:
        click.echo(f"Revoked the token of {kind} {name!r}; it is refused from the next request on.")
    if kind == "office":
        click.echo(
            f"To let the office sync again: fieldsync hub rotate-token {name} --db {db_path}"
        )


@hub.command("rotate-token")
@click.argument("name")
@hub_db
@_kind
@_kind_admin
def hub_rotate_token(name: str, db_path: str, kind: str | None) -> None:
    """Give office or admin NAME a new token; print it on the last line (keep it secret).

    The old token is refused from the next request on, even on a running hub; a
    revoked office or admin is active again. An office keeps what the hub knows of it
    (its changes already taken); set the new token at the office with
    `fieldsync node set --token NEW` and its waiting changes go on its next sync.
    """
    with _open_hub(db_path) as store:
        kind, token = store.rotate_token(name, kind)
    where = (
        " (set it at the office with `fieldsync node set --token NEW`)" if kind == "office" else ""
    )
    click.echo(f"New token of {kind} {name!r}{where}. Shown once, stored only as a hash:")
    click.echo(token)


@hub.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(_ROLES))
@hub_db
def hub_set_role(name: str, role: str, db_path: str) -> None:
    """Change admin NAME's role (viewer, resolver or owner); effective at once."""
    with _open_hub(db_path) as store:
        old = store.set_role(name, role)
    from hub.admin import with_article

    click.echo(f"Admin {name!r} is now {with_article(role)} (was {with_article(old)}).")


@hub.command("admins")
@hub_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_admins(db_path: str, as_json: bool) -> None:
    """List the admins, their roles and whether their tokens are revoked."""
    with _open_hub(db_path) as store:
        found = store.admins()
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo("No admins yet; make one with `fieldsync hub add-admin NAME --role ROLE`.")
    for admin in found:
        revoked = f"  revoked {admin['revoked_at']}" if admin["revoked_at"] else ""
        click.echo(f"{admin['name']}  {admin['role']}  made {admin['created_at']}{revoked}")


@hub.command("audit")
@hub_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="How many entries, newest first.",
)
def hub_audit(db_path: str, as_json: bool, limit: int) -> None:
    """Show the audit log, newest first: who did what, when, from where.

    Sign-ins (failed and throttled ones too), resolutions, downloads and exports,
    record histories read, tokens revoked and rotated, roles changed, offices and
    admins added. It never holds case values.
    """
    with _open_hub(db_path) as store:
        entries = store.audit_entries(limit)
    if as_json:
        echo_json(entries)
        return
    if not entries:
        click.echo("The audit log is empty.")
    for e in entries:
        detail = ", ".join(
            f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in e["detail"].items()
        )
        target = f" {e['target']}" if e["target"] else ""
        click.echo(
            f"{e['at']}  {e['actor']}@{e['source']}  {e['action']}{target}"
            + (f"  ({detail})" if detail else "")
        )
