"""
``fieldsync node …``: set up an office database, sync it once or on a schedule, and
show its status. What the hub refused or overruled is in fieldsync/review_commands.py.

The office's modules are imported inside command bodies, so that ``fieldsync hub …``
commands load none of them (nor httpx and APScheduler).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING

import click

from fieldsync.options import Group, load_schema, node_db, schema_option
from shared.errors import FieldsyncError, HubUnavailableError

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from node.agent import SyncAgent, SyncReport
    from node.store import HubSettings


@click.group(cls=Group)
def node() -> None:
    """Set up and sync an office database."""


_ca_file = click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="The certificate (PEM) of the private CA that signed the hub's, for an https:// "
    "hub whose certificate no public CA signed.",
)


@node.command("init")
@node_db
@click.option("--name", required=True, help="The office name, as registered on the hub.")
@click.option("--hub", "hub_url", required=True, help="The hub URL, e.g. https://hub.example.org.")
@click.option("--token", required=True, help="The office token from `fieldsync hub add-node`.")
@_ca_file
@click.option(
    "--allow-http",
    is_flag=True,
    help="Accept an http:// hub URL on another machine (token and case data unencrypted: "
    "only over a link protected otherwise, such as a VPN).",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Create the office without asking the hub whether the token is this office's "
    "(when the hub cannot be reached from here yet).",
)
@schema_option
def node_init(
    db_path: str,
    name: str,
    hub_url: str,
    token: str,
    ca_file: str | None,
    allow_http: bool,
    offline: bool,
    schema_path: str | None,
) -> None:
    """Create an office database with the synced tables and change capture.

    The token is checked with the hub first (the hub must accept it as this office's);
    --offline skips the check.
    """
    from node.link import check_hub_url, check_link, check_token
    from node.store import HubSettings, NodeStore
    from shared.clock import check_node_name

    check_node_name(name)
    check_token(token)
    hub_url = check_hub_url(hub_url)
    check_link(hub_url, allow_http)
    ca_file = _checked_ca_file(ca_file)
    schema = load_schema(schema_path)  # local mistakes first, before asking the hub
    checked = "not checked with the hub (--offline)"
    if not offline:
        settings = HubSettings(hub_url, token, ca_file)
        checked = _check_token(name, settings, creating=True)
    store = NodeStore.init(
        db_path,
        name,
        hub_url,
        token,
        schema,
        ca_file=ca_file,
        allow_http=allow_http,
    )
    pending = store.pending_count()
    tables = ", ".join(store.schema.tables)
    store.close()
    click.echo(f"Created office {name!r} in {db_path} (synced tables: {tables}).")
    click.echo(f"Token: {checked}.")
    if pending:
        click.echo(f"{pending} existing rows will be pushed on the first sync.")


def _checked_ca_file(ca_file: str | None) -> str | None:
    """The CA file's absolute path (the agent may run elsewhere), once it loads."""
    if not ca_file:
        return ca_file
    from node.client import tls_context

    path = os.path.abspath(ca_file)
    tls_context("https://hub", path)  # a one-line error if it is not a PEM certificate
    return path


def _agent(db_path: str, batch_size: int | None = None) -> SyncAgent:
    from node.agent import SyncAgent
    from node.client import HttpHubClient
    from node.store import NodeStore

    store = NodeStore(db_path)
    try:
        client = HttpHubClient.from_settings(store.hub_settings(), store.node)
    except BaseException:
        store.close()
        raise
    # The agent makes a new client when `node set` changes the settings, and only then.
    connect = functools.partial(HttpHubClient.from_settings, node=store.node)
    if batch_size is None:
        return SyncAgent(store, client, connect=connect)
    return SyncAgent(store, client, batch_size=batch_size, connect=connect)


@node.command("sync")
@node_db
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
        raise FieldsyncError(
            f"{_named(exc, db_path)}{_kept(agent.store.pending_count(), exc)}"
        ) from exc
    finally:
        bar.close()
        agent.client.close()
        agent.store.close()
    click.echo(f"Synced {agent.store.node}: {report.summary()}")
    if report.lost or report.resolved:
        click.echo(f"See what won: `fieldsync node conflicts {db_path}`", err=True)
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
        self.bar: ProgressBar[int] | None = None
        self.done = 0

    def update(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = "Pushing changes" if phase == "push" else "Pulling records"
        if not sys.stderr.isatty():
            click.echo(f"{label}: {done}/{total}", err=True)
            return
        bar = self.bar
        if phase != self.phase or bar is None:
            self.close()
            bar = click.progressbar(
                length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True
            )
            bar.__enter__()
            self.bar, self.phase, self.done = bar, phase, 0
        if bar.length != total:
            bar.length = total
        bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _named(exc: FieldsyncError | None, db_path: str) -> str:
    """An error's message, its advice naming this office's database."""
    return str(exc).replace(" NODE.db ", f" {db_path} ")


def _kept(pending: int, exc: FieldsyncError) -> str:
    if pending == 0:
        return ""
    what = "1 local change is" if pending == 1 else f"{pending} local changes are"
    if isinstance(exc, HubUnavailableError):
        return f" — {what} kept and will be sent when the hub can take them"
    return f" — {what} kept and will be sent once this is fixed"


@node.command("set")
@node_db
@click.option("--hub", "hub_url", help="A new hub URL.")
@click.option("--token", help="A new office token (after the old one was revoked or rotated).")
@_ca_file
@click.option("--no-ca-file", is_flag=True, help="Verify the hub with the usual public CAs again.")
@click.option(
    "--allow-http/--no-allow-http",
    default=None,
    help="Accept (or no longer accept) an http:// hub URL on another machine.",
)
@click.option(
    "--offline", is_flag=True, help="Set the token without checking it with the hub first."
)
@click.option(
    "--keep-acked",
    metavar="TIME",
    help="How long to keep acknowledged changes, to re-send to a hub restored from a "
    "backup (e.g. 30d, 12h; default 30d).",
)
def node_set(
    db_path: str,
    hub_url: str | None,
    token: str | None,
    ca_file: str | None,
    no_ca_file: bool,
    allow_http: bool | None,
    offline: bool,
    keep_acked: str | None = None,
) -> None:
    """Point an office database at another hub URL, token or CA file.

    A new token is checked with the hub first when the hub can be reached (the hub
    must accept it as this office's). A running `node run` takes the new settings
    on its next sync.
    """
    from node.link import check_hub_url, check_link, check_token
    from node.store import NodeStore

    if keep_acked is not None:
        from node.restore import parse_window, set_window, window_text

        window = parse_window(keep_acked)
        if window == 0:
            click.echo(
                "Warning: acknowledged changes are no longer kept: a hub restored from a "
                "backup cannot be sent again what it lacks.",
                err=True,
            )
        if not (hub_url or token or ca_file or no_ca_file or allow_http is not None):
            with NodeStore(db_path) as store:
                set_window(store.db, window)
            click.echo(f"Office {store.node}: acknowledged changes kept {window_text(window)}.")
            return
    if not (hub_url or token or ca_file or no_ca_file or allow_http is not None):
        raise click.ClickException(
            "give --hub URL, --token TOKEN, --ca-file FILE, --no-ca-file, --allow-http "
            "or --keep-acked TIME"
        )
    if ca_file and no_ca_file:
        raise click.ClickException("give --ca-file or --no-ca-file, not both")
    hub_url = check_hub_url(hub_url) if hub_url else None
    if token:
        check_token(token)
    ca_file = "" if no_ca_file else _checked_ca_file(ca_file)
    with NodeStore(db_path) as store:
        before = store.hub_settings()
        url = hub_url or before.hub_url
        if hub_url or allow_http is False:  # a URL set before stays usable
            check_link(url, store.allow_http if allow_http is None else allow_http)
        checked = None
        if token and token != before.token and not offline:
            from node.store import HubSettings

            new_ca = before.ca_file if ca_file is None else ca_file or None
            checked = _check_token(store.node, HubSettings(url, token, new_ca))
        store.set_hub(hub_url, token, ca_file=ca_file, allow_http=allow_http)
        if keep_acked is not None:
            set_window(store.db, window)
        after = store.hub_settings()
        allowed = store.allow_http
    said = []
    if after.hub_url != before.hub_url:
        said.append(f"hub URL now {after.hub_url}")
    if after.token != before.token:
        said.append("token replaced" + (f" ({checked})" if checked else ""))
    if after.ca_file != before.ca_file:
        said.append(f"CA file now {after.ca_file}" if after.ca_file else "no CA file")
    if allow_http is not None:
        said.append("plain http allowed" if allowed else "plain http refused")
    if keep_acked is not None:
        said.append(f"acknowledged changes kept {window_text(window)}")
    click.echo(f"Office {store.node}: {'; '.join(said) or 'nothing changed'}.")
    if said and after != before:
        click.echo("A running `fieldsync node run` uses this from its next sync.", err=True)


def _check_token(node: str, settings: HubSettings, *, creating: bool = False) -> str:
    """Ask the hub whether it accepts ``settings.token`` as ``node``'s: raise if it says
    no; return how it was checked (or why it was not).

    ``creating`` (``node init``): a hub that cannot be reached is a refusal too, since
    nothing would ever have checked the token.
    """
    from node.client import HttpHubClient

    nothing, anyway = ("created", "create") if creating else ("changed", "set")
    try:
        # A hub that does not answer within 10 s is as good as unreachable here.
        with HttpHubClient.from_settings(settings, node, timeout_seconds=10) as client:
            owner = client.token_owner()
    except HubUnavailableError as exc:
        if creating:
            raise FieldsyncError(
                f"{exc}; nothing was created. Check the hub URL, or create the office "
                "without checking its token with --offline"
            ) from exc
        return f"not checked: {exc}"
    if not owner.accepted:
        raise FieldsyncError(
            f"the hub at {settings.hub_url} does not accept this token (unknown or revoked); "
            f"nothing was {nothing}. Check it, or {anyway} it anyway with --offline"
        )
    if owner.node is not None and owner.node != node:
        raise FieldsyncError(
            f"this token belongs to office {owner.node!r}, not {node!r}; nothing was "
            f"{nothing}. Use the token made for {node!r}"
        )
    return "the hub accepts it" if owner.node is None else f"the hub accepts it as {node}'s"


@node.command("run")
@node_db
@click.option(
    "--interval",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0.1, 7 * 86400),  # NaN passes a range: refused below
    help="Seconds, 0.1 to 604800 (a week).",
)
@click.option(
    "--heartbeat",
    default=600.0,
    show_default=True,
    type=click.FloatRange(1, 7 * 86400),
    help="Seconds between 'still syncing' lines while syncs have nothing to move.",
)
def node_run(db_path: str, interval: float, heartbeat: float) -> None:
    """Run the sync agent: sync every INTERVAL seconds until Ctrl-C or SIGTERM.

    Each line starts with the local time. A sync that moved nothing prints nothing
    (but the first); a 'still syncing' line comes every HEARTBEAT seconds instead.
    A failed sync says when the next try comes.
    """
    if interval != interval:
        raise click.BadParameter("not a number", param_hint="'--interval'")
    agent = _agent(db_path)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        click.echo(f"{_now()} Stopping after the current sync ({name}).", err=True)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    quiet = _Quiet(heartbeat)

    def on_report(report: SyncReport | None, error: FieldsyncError | None) -> None:
        if report is not None:
            if quiet.says(report):
                click.echo(f"{_now()} Synced {agent.store.node}: {report.summary()}")
            elif quiet.heartbeat_due():
                click.echo(f"{_now()} Still syncing {agent.store.node}: {quiet.summary()}")
            return
        quiet.failed()
        wait = agent.next_try_seconds
        next_try = f"; next try in {wait:.0f} s" if wait is not None else ""
        click.echo(
            f"{_now()} Sync failed: {_named(error, db_path)} (changes are kept){next_try}",
            err=True,
        )

    click.echo(f"{_now()} Syncing {agent.store.node} every {interval:g} s; Ctrl-C stops.", err=True)
    try:
        agent.run(interval, stop=stop, on_report=on_report)
    finally:
        agent.client.close()
        agent.store.close()
    click.echo(f"{_now()} Stopped.", err=True)


def _now() -> str:
    """The local time, as each line of `node run` starts."""
    return datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")


class _Quiet:
    """Which syncs `node run` reports: the first, those that moved something, and a
    heartbeat every ``heartbeat_seconds`` for the quiet ones between."""

    def __init__(self, heartbeat_seconds: float) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.first = True
        self.quiet = 0  # syncs with nothing to move since the last line
        self.last_line = time.monotonic()

    def says(self, report: SyncReport) -> bool:
        moved = report.pushed or report.pulled or report.conflicts or report.rejected
        moved = moved or report.lost or report.resolved
        if moved or self.first:
            self.first, self.quiet, self.last_line = False, 0, time.monotonic()
            return True
        self.quiet += 1
        return False

    def heartbeat_due(self) -> bool:
        if time.monotonic() - self.last_line < self.heartbeat_seconds:
            return False
        self.last_line = time.monotonic()
        return True

    def summary(self) -> str:
        said, self.quiet = self.quiet, 0
        return f"{said} sync{'' if said == 1 else 's'} with nothing to move"

    def failed(self) -> None:
        self.last_line = time.monotonic()


@node.command("status")
@node_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def node_status(db_path: str, as_json: bool) -> None:
    """Show pending changes, the last sync and the last error."""
    from node.agent import LARGE_OFFSET_MS
    from node.restore import kept, window_text
    from node.store import NodeStore

    with NodeStore(db_path) as store:
        status = store.status()
        retention = kept(store.db)
    if as_json:
        click.echo(json.dumps({**status.to_json(), **retention.to_json()}, indent=2))
        return
    click.echo(f"Office:            {status.node}  (hub {status.hub_url})")
    if status.unencrypted:
        click.echo(
            "Link:              UNENCRYPTED (http:// to another machine): the token and "
            "case data travel in clear; use an https:// hub URL"
        )
    elif status.ca_file:
        click.echo(f"Link:              https, verified with the CA in {status.ca_file}")
    click.echo(f"Pending changes:   {status.pending}")
    if status.oldest_pending_at:
        click.echo(f"Oldest pending:    {status.oldest_pending_at}")
    click.echo(f"Last sync:         {status.last_sync_at or 'never'}")
    click.echo(f"Last success:      {status.last_success_at or 'never'}")
    if status.last_error:
        click.echo(f"Last error:        {status.last_error} ({status.last_error_at})")
    if status.next_try_at and status.last_error:
        click.echo(f"Next try:          {status.next_try_at} (backing off after failures)")
    if status.rejected:
        click.echo(
            f"Rejected changes:  {status.rejected}, kept here "
            f"(see `fieldsync node rejected {db_path}`)"
        )
    if status.conflicts.lost:
        lost = status.conflicts
        click.echo(
            f"Lost edits:        {lost.lost} of this office's edits lost at the hub "
            f"({lost.open} awaiting an admin, {lost.resolved} resolved) "
            f"(see `fieldsync node conflicts {db_path}`)"
        )
    click.echo(
        f"Kept changes:      {retention.kept} acknowledged, kept "
        f"{window_text(retention.keep_seconds)} to re-send to a hub restored from a backup"
    )
    if retention.hub_restored:
        click.echo(f"Hub restored:      {retention.hub_restored}")
    if abs(status.clock_offset_ms) >= LARGE_OFFSET_MS:
        direction = "behind" if status.clock_offset_ms > 0 else "ahead of"
        click.echo(
            f"Clock:             {abs(status.clock_offset_ms) / 1000:.0f} s {direction} the hub "
            "(corrected when stamping changes)"
        )
