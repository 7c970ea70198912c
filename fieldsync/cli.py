"""
The one fieldsync command line: ``fieldsync hub …``, ``fieldsync node …``, ``fieldsync demo``.

Library code never prints or exits: each group (:class:`fieldsync.options.Group`)
turns every FieldsyncError (and bad values) into a one-line ``Error: …`` and exit
code 1; ``--debug`` shows tracebacks. The commands of each side live in
``fieldsync/hub_commands.py`` and ``fieldsync/node_commands.py``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import click

from fieldsync.backup_commands import hub_backup, hub_restore, node_backup
from fieldsync.compact_commands import hub_compact, node_compact
from fieldsync.hub_commands import hub
from fieldsync.migrate_commands import hub_migrate
from fieldsync.node_commands import node
from fieldsync.options import Group
from fieldsync.review_commands import node_conflicts, node_drop_change, node_rejected, node_retry
from fieldsync.schema_commands import hub_schema
from fieldsync.scope_commands import hub_move, hub_scope
from shared import __version__


@click.group(cls=Group)
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


hub.add_command(hub_scope)
hub.add_command(hub_move)
for command in (hub_backup, hub_restore):
    hub.add_command(command)
node.add_command(node_backup)
hub.add_command(hub_compact)
node.add_command(node_compact)
for command in (node_conflicts, node_rejected, node_retry, node_drop_change):
    node.add_command(command)
hub.add_command(hub_schema)
hub.add_command(hub_migrate)
cli.add_command(hub)
cli.add_command(node)


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
    """Show a hub and three offices syncing: sync scopes, an outage, a conflict, a move.

    It ends with the address of the admin dashboard and an admin token.
    """
    from fieldsync.demo import run_demo

    stop = threading.Event()
    if serve:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            click.echo(f"Stopping the demo ({signal.Signals(signum).name}).", err=True)
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    run_demo(click.echo, keep_dir, serve_port=port if serve else None, stop=stop)


def main() -> None:  # pragma: no cover - console script entry
    cli(prog_name="fieldsync")
    sys.exit(0)
