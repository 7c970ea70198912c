"""
The one fieldsync command line: ``fieldsync hub …``, ``fieldsync node …``, ``fieldsync demo``.

Library code never prints or exits; this module turns every FieldsyncError (and bad
values) into a one-line ``Error: …`` and exit code 1. ``--debug`` shows tracebacks.
It imports node/ and hub/ inside command bodies, so ``shared`` never depends on them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
from typing import Any

import click

from shared import __version__
from shared.errors import FieldsyncError, HubUnavailableError


class _Group(click.Group):
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


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug"))


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="fieldsync")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
def cli(debug: bool) -> None:
    """Offline-first sync of office SQLite databases through a central hub."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


@cli.group(cls=_Group)
def hub() -> None:
    """Run and administer the hub."""


@cli.group(cls=_Group)
def node() -> None:
    """Set up and sync an office database."""


_hub_db = click.option(
    "--db", "db_path", required=True, type=click.Path(dir_okay=False), help="The hub database."
)
_schema = click.option(
    "--schema",
    "schema_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Schema file (TOML) declaring the synced tables; default: case management.",
)


def _load_schema(path: str | None) -> Any:
    from shared.schema import Schema

    return Schema.load(path) if path else None


def _open_hub(db_path: str, schema_path: str | None = None, create: bool = False) -> Any:
    from hub.store import SqliteHubStore

    return SqliteHubStore(db_path, _load_schema(schema_path), create=create)


_stale_after = click.option(
    "--stale-after",
    type=click.IntRange(1, 10 * 366 * 86400),
    metavar="SECONDS",
    help="An office with no successful sync for this long is stale "
    "[default: 3 of its sync intervals; 3 minutes when it has not said].",
)


def _stale(seconds: int | None) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds) if seconds else None


@hub.command("serve")
@_hub_db
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
@_schema
def hub_serve(
    db_path: str,
    host: str,
    port: int,
    max_future_seconds: int,
    stale_after: int | None,
    schema_path: str | None,
) -> None:
    """Serve the hub over HTTP (under uvicorn): the sync API, and the admin dashboard at /."""
    import uvicorn

    from hub.app import create_app

    _listen(host, port).close()  # a port in use is a one-line error, before any file
    new = not os.path.exists(db_path)
    store = _open_hub(db_path, schema_path, create=True)
    if new:
        click.echo(f"Created a new hub database {db_path}; register offices with hub add-node.")
    store.max_future_ms = max_future_seconds * 1000
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"fieldsync hub {__version__}: {db_path} on http://{shown}:{port}", err=True)
    try:
        app = create_app(store, stale_after=_stale(stale_after))
        # uvicorn binds the port again (serving on a socket handed to it measured
        # about 8% slower per pushed change).
        config = uvicorn.Config(app, host=host, port=port, log_level="info")
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: shut down cleanly, exit 0
            server.run()
        if not server.started:
            raise FieldsyncError(f"the hub did not start on {host}:{port} (see the log above)")
    finally:
        store.close()


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
@_hub_db
@_schema
def hub_add_node(name: str, db_path: str, schema_path: str | None) -> None:
    """Register an office; print its token on the last line (keep it secret)."""
    store = _open_hub(db_path, schema_path, create=True)
    try:
        token = store.add_node(name)
    finally:
        store.close()
    click.echo(f"Registered office {name!r}. Its token (shown once, stored only as a hash):")
    click.echo(token)


@hub.command("add-admin")
@click.argument("name")
@_hub_db
def hub_add_admin(name: str, db_path: str) -> None:
    """Make an admin; print the admin token on the last line (keep it secret).

    The token signs in to the dashboard at the hub's address and is the bearer
    token of the admin API and /metrics.
    """
    store = _open_hub(db_path, create=True)
    try:
        token = store.add_admin(name)
    finally:
        store.close()
    click.echo(f"Made admin {name!r}. The token (shown once, stored only as a hash):")
    click.echo(token)


@hub.command("status")
@_hub_db
@_stale_after
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_status(db_path: str, stale_after: int | None, as_json: bool) -> None:
    """Show how every office syncs: health, last sync, pending, lag, conflicts, errors."""
    from hub.monitor import ago

    store = _open_hub(db_path)
    try:
        offices = store.offices(stale_after=_stale(stale_after))
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([o.to_json() for o in offices], indent=2, ensure_ascii=False))
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
@_hub_db
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
    store = _open_hub(db_path)
    try:
        records = store.conflicts(None if status == "all" else status)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in records], indent=2, ensure_ascii=False))
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
@_hub_db
@click.option("--office", help="Only this office's rejected changes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hub_rejected(db_path: str, office: str | None, as_json: bool) -> None:
    """List changes the hub rejected (the office keeps their values)."""
    store = _open_hub(db_path)
    try:
        rejected = store.rejected(office)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rejected, indent=2, ensure_ascii=False))
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
@_hub_db
@click.option("--format", "fmt", required=True, metavar="csv|json", help="csv or json.")
@click.option(
    "--office",
    help="Only records whose latest change came from this office (hub: an admin's).",
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

    Reads the hub database read-only, row by row: safe while the hub serves, and
    fit for tables of millions of records.
    """
    from hub.export import export_rows, export_to_path

    if out_path == "-":
        stdout = getattr(sys.stdout, "buffer", sys.stdout)  # UTF-8 bytes, whatever the locale
        export_rows(db_path, table, fmt.lower(), stdout, office)
        stdout.flush()
        return
    count = export_to_path(db_path, table, fmt.lower(), out_path, office)
    click.echo(
        f"Exported {count} row{'' if count == 1 else 's'} of {table} to {out_path}", err=True
    )


def _show(value: Any, kind: str) -> str:
    if kind == "delete" and value is None:
        return "(delete)"
    return json.dumps(value, ensure_ascii=False)


@hub.command("resolve")
@click.argument("conflict_id", type=click.IntRange(1, 2**63 - 1))
@_hub_db
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
    store = _open_hub(db_path)
    try:
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
            parsed = _parse_value(store, record, value)
        elif value is not None:
            raise click.ClickException("--value goes with --keep value")
        done = store.resolve(conflict_id, side, by, parsed, force=force)
    finally:
        store.close()
    click.echo(
        f"Conflict {done.id} resolved ({side}); offices get the decision on their next sync."
    )


def _parse_value(store: Any, record: Any, text: str) -> Any:
    if record.column is None:
        raise click.ClickException(
            f"conflict {record.id} is about a whole record; use --keep kept or --keep other"
        )
    column = store.schema.table(record.table).column(record.column)
    if text == "null":
        return None
    if column.type in ("INTEGER", "INT"):
        try:
            return int(text)
        except ValueError:
            raise click.ClickException(f"{record.column} takes whole numbers") from None
    if column.type in ("REAL", "FLOAT", "DOUBLE", "NUMERIC"):
        try:
            return float(text)
        except ValueError:
            raise click.ClickException(f"{record.column} takes numbers") from None
    if text.startswith('"'):  # a JSON string: '"null"' is the text null
        try:
            quoted = json.loads(text)
        except ValueError:
            quoted = None
        if isinstance(quoted, str):
            return quoted
    return text


@node.command("init")
@click.argument("db_path", metavar="NODE.db", type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="The office name, as registered on the hub.")
@click.option("--hub", "hub_url", required=True, help="The hub URL, e.g. http://hub:8000.")
@click.option("--token", required=True, help="The office token from `fieldsync hub add-node`.")
@_schema
def node_init(db_path: str, name: str, hub_url: str, token: str, schema_path: str | None) -> None:
    """Create an office database with the synced tables and change capture."""
    from node.store import NodeStore

    store = NodeStore.init(db_path, name, hub_url, token, _load_schema(schema_path))
    pending = store.pending_count()
    tables = ", ".join(store.schema.tables)
    store.close()
    click.echo(f"Created office {name!r} in {db_path} (synced tables: {tables}).")
    if pending:
        click.echo(f"{pending} existing rows will be pushed on the first sync.")


def _agent(db_path: str, batch_size: int | None = None) -> Any:
    from node.agent import SyncAgent
    from node.client import HttpHubClient
    from node.store import NodeStore

    store = NodeStore(db_path)
    client = HttpHubClient(store.hub_url, store.token, node=store.node)
    if batch_size is None:
        return SyncAgent(store, client)
    return SyncAgent(store, client, batch_size=batch_size)


_node_db = click.argument("db_path", metavar="NODE.db", type=click.Path(dir_okay=False))


@node.command("sync")
@_node_db
@click.option(
    "--batch-size",
    default=5000,
    show_default=True,
    type=click.IntRange(1, 10000),
    help="Changes per push request; less on a very slow or often-cut link.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (default: when stderr is a terminal).",
)
def node_sync(db_path: str, batch_size: int, progress: bool | None) -> None:
    """Push and pull once, now."""
    agent = _agent(db_path, batch_size)
    bar = _ProgressBar(sys.stderr.isatty() if progress is None else progress)
    try:
        report = agent.sync_once(bar.update)
    except FieldsyncError as exc:
        raise FieldsyncError(f"{exc}{_kept(agent.store.pending_count(), exc)}") from exc
    finally:
        bar.close()
        agent.client.close()
        agent.store.close()
    click.echo(f"Synced {agent.store.node}: {report.summary()}")
    if report.rejected:
        click.echo(
            f"The hub rejected {report.rejected} change"
            + (" (it is" if report.rejected == 1 else "s (they are")
            + f" kept here): see `fieldsync node rejected {db_path}`",
            err=True,
        )


class _ProgressBar:
    """One click progress bar per phase of a sync (push, then pull), on stderr.

    Where stderr is not a terminal (a log file), each step is a line instead.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.phase = ""
        self.bar: Any = None
        self.done = 0

    def update(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = "Pushing changes" if phase == "push" else "Pulling records"
        if not sys.stderr.isatty():
            click.echo(f"{label}: {done}/{total}", err=True)
            return
        if phase != self.phase:
            self.close()
            self.bar = click.progressbar(
                length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True
            )
            self.bar.__enter__()
            self.phase, self.done = phase, 0
        if self.bar.length != total:
            self.bar.length = total
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _kept(pending: int, exc: FieldsyncError) -> str:
    if pending == 0:
        return ""
    what = "1 local change is" if pending == 1 else f"{pending} local changes are"
    if isinstance(exc, HubUnavailableError):
        return f" — {what} kept and will be sent when the hub can take them"
    return f" — {what} kept and will be sent once this is fixed"


@node.command("set")
@_node_db
@click.option("--hub", "hub_url", help="A new hub URL.")
@click.option("--token", help="A new office token (after the old one was revoked).")
def node_set(db_path: str, hub_url: str | None, token: str | None) -> None:
    """Point an office database at another hub URL or token."""
    from node.store import NodeStore

    if not hub_url and not token:
        raise click.ClickException("give --hub URL, --token TOKEN or both")
    store = NodeStore(db_path)
    try:
        store.set_hub(hub_url, token)
    finally:
        store.close()
    click.echo(f"Office {store.node} now syncs with {store.hub_url}.")


@node.command("rejected")
@_node_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON (values included).")
def node_rejected(db_path: str, as_json: bool) -> None:
    """List the changes the hub rejected: kept here, with the hub's reason."""
    from node.store import NodeStore

    store = NodeStore(db_path)
    try:
        rejected = store.rejected()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rejected, indent=2, ensure_ascii=False))
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


@node.command("retry")
@_node_db
@click.argument("seq", type=click.IntRange(1, 2**63 - 1))
def node_retry(db_path: str, seq: int) -> None:
    """Write rejected change SEQ again as a new change (once its cause is fixed)."""
    from node.store import NodeStore

    store = NodeStore(db_path)
    try:
        store.retry_rejected(seq)
    finally:
        store.close()
    click.echo(f"Change {seq} is written again and queued; it is sent on the next sync.")


@node.command("drop-change")
@_node_db
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


@node.command("run")
@_node_db
@click.option(
    "--interval",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0.1, 7 * 86400),  # NaN passes a range: refused below
    help="Seconds, 0.1 to 604800 (a week).",
)
def node_run(db_path: str, interval: float) -> None:
    """Run the sync agent: sync every INTERVAL seconds until Ctrl-C or SIGTERM."""
    if interval != interval:
        raise click.BadParameter("not a number", param_hint="'--interval'")
    agent = _agent(db_path)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        click.echo(f"Stopping after the current sync ({signal.Signals(signum).name}).", err=True)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def on_report(report: Any, error: FieldsyncError | None) -> None:
        if report is not None:
            click.echo(f"Synced {agent.store.node}: {report.summary()}")
        else:
            click.echo(f"Sync failed: {error} (changes are kept)", err=True)

    click.echo(f"Syncing {agent.store.node} every {interval:g} s; Ctrl-C stops.", err=True)
    try:
        agent.run(interval, stop=stop, on_report=on_report)
    finally:
        agent.client.close()
        agent.store.close()
    click.echo("Stopped.", err=True)


@node.command("status")
@_node_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def node_status(db_path: str, as_json: bool) -> None:
    """Show pending changes, the last sync and the last error."""
    from node.agent import LARGE_OFFSET_MS
    from node.store import NodeStore

    store = NodeStore(db_path)
    try:
        status = store.status()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(status.to_json(), indent=2))
        return
    click.echo(f"Office:            {status.node}  (hub {status.hub_url})")
    click.echo(f"Pending changes:   {status.pending}")
    if status.oldest_pending_at:
        click.echo(f"Oldest pending:    {status.oldest_pending_at}")
    click.echo(f"Last sync:         {status.last_sync_at or 'never'}")
    click.echo(f"Last success:      {status.last_success_at or 'never'}")
    if status.last_error:
        click.echo(f"Last error:        {status.last_error} ({status.last_error_at})")
    if status.rejected:
        click.echo(
            f"Rejected changes:  {status.rejected}, kept here "
            f"(see `fieldsync node rejected {db_path}`)"
        )
    if abs(status.clock_offset_ms) >= LARGE_OFFSET_MS:
        direction = "behind" if status.clock_offset_ms > 0 else "ahead of"
        click.echo(
            f"Clock:             {abs(status.clock_offset_ms) / 1000:.0f} s {direction} the hub "
            "(corrected when stamping changes)"
        )


@cli.command("demo")
@click.option("--keep", "keep_dir", type=click.Path(file_okay=False), help="Keep files in DIR.")
@click.option(
    "--serve", is_flag=True, help="Keep the hub and its dashboard up afterwards (Ctrl-C stops)."
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="With --serve: the loopback port of the hub (0: any free one).",
)
def demo(keep_dir: str | None, serve: bool, port: int) -> None:
    """Show two offices and a hub syncing, with an outage and a conflict.

    It ends with the address of the admin dashboard and an admin token.
    """
    from shared.demo import run_demo

    stop = threading.Event()
    if serve:

        def on_signal(signum: int, frame: Any) -> None:
            click.echo(f"Stopping the demo ({signal.Signals(signum).name}).", err=True)
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    run_demo(click.echo, keep_dir, serve_port=port if serve else None, stop=stop)


def main() -> None:  # pragma: no cover - console script entry
    cli(prog_name="fieldsync")
    sys.exit(0)
