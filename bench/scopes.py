"""
What sync scopes save as offices multiply: records pulled, hub CPU and wall time per sync.

For each K in ``--offices`` (default 20 and 100) two hubs are measured in the same run,
one after the other: **unscoped** (the shipped schema without its two ``scope = …``
lines: every office holds every record) and **scoped** (the shipped schema; each
office is registered as ``fieldsync hub add-node NAME`` registers it, so it holds the
cases whose ``office`` column is its own name). Each hub is a real ``fieldsync hub
serve`` subprocess on 127.0.0.1, started on a fresh database; the K offices live in this
process (``NodeStore.init`` + ``HttpHubClient`` + ``SyncAgent``, one HTTP client kept
per office), as in bench/bench.py.

Each of ``--rounds`` rounds: every office inserts 5 cases whose ``office`` is its own
name, then every office syncs once, one after the other (sequentially: no two syncs
overlap, so the hub serves one office at a time). Per sync: records pulled (the
agent's report), hub CPU time (utime + stime of the hub process from /proc/PID/stat,
read before and after the round, divided by the syncs of the round) and wall time (the
round's syncs timed one by one, averaged). The figures are taken over rounds 2 to N:
round 1 is shown apart (``--json``), since an office early in the first round has little
to pull and every office's first sync sets up its connection. Each figure is the median
of ``--repeat`` repetitions; the order of the two hubs alternates between repetitions.

Every run checks, after one more (unmeasured) sync of every office, that each office
holds exactly its own 5 x rounds cases on the scoped hub and all K x 5 x rounds on the
unscoped one.

Run ``.venv/bin/python bench/scopes.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import COLUMNS, INSERT, BenchError, Hub, case_rows, machine, open_db, progress
from hub.store import SqliteHubStore
from node.agent import SyncAgent
from node.client import HttpHubClient
from node.store import NodeStore
from shared.schema import Schema

CHANGES = 5  # cases each office makes per round
KINDS = ("unscoped", "scoped")
OFFICE_COLUMN = COLUMNS.index("office")
FIGURES = {  # key in a run's summary: column heading
    "pulled": "records pulled per sync",
    "hub_cpu_ms": "hub CPU ms per sync",
    "wall_ms": "wall ms per sync",
}


def unscoped_schema() -> Schema:
    """The shipped schema without its two ``scope = …`` lines."""
    text, count = re.subn(r"^scope = .*\n", "", Schema.load().source, flags=re.M)
    schema = Schema.from_toml(text, "the shipped schema without its scope lines")
    if count != 2 or schema.scoped:
        raise BenchError(f"expected two `scope = ` lines in the shipped schema, found {count}")
    return schema


def hub_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread), in seconds, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the hub's CPU time: {exc}") from exc
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Office:
    name: str
    path: Path
    agent: SyncAgent

    def close(self) -> None:
        self.agent.client.close()
        self.agent.store.close()


def insert_cases(office: Office, rows: Iterator[tuple[Any, ...]]) -> None:
    """``CHANGES`` new cases at ``office``, each naming it in its ``office`` column."""
    mine = [
        row[:OFFICE_COLUMN] + (office.name,) + row[OFFICE_COLUMN + 1 :]
        for row in (next(rows) for _ in range(CHANGES))
    ]
    conn = open_db(office.path)
    try:
        conn.execute("BEGIN")
        conn.executemany(INSERT, mine)
        conn.execute("COMMIT")
    finally:
        conn.close()


def count_cases(office: Office) -> tuple[int, int]:
    """(cases held, of which its own) at ``office``."""
    conn = open_db(office.path)
    try:
        total, own = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE office = ?) FROM cases", [office.name]
        ).fetchone()
        return int(total), int(own)
    finally:
        conn.close()


def sync_round(hub: Hub, offices: Sequence[Office]) -> dict[str, Any]:
    """Every office syncs once, in turn; what the round cost the hub and the offices."""
    gc.collect()
    walls: list[float] = []
    pulled = pushed = 0
    cpu_before = hub_cpu_seconds(hub.process.pid)
    for office in offices:
        started = time.perf_counter()
        report = office.agent.sync_once()
        walls.append(time.perf_counter() - started)
        pulled += report.pulled
        pushed += report.pushed
    cpu = hub_cpu_seconds(hub.process.pid) - cpu_before
    return {
        "syncs": len(offices),
        "pushed": pushed,
        "pulled": pulled,
        "hub_cpu_s": cpu,
        "wall_s": sum(walls),
        "wall_max_s": max(walls),
    }


def hub_run(
    kind: str, k: int, rounds: int, workdir: Path, timeout: float, seed: int
) -> dict[str, Any]:
    """One repetition for one hub: a fresh hub and K fresh offices, ``rounds`` rounds."""
    schema = Schema.load() if kind == "scoped" else unscoped_schema()
    names = [f"office-{i + 1:03d}" for i in range(k)]
    (workdir / "hub").mkdir(parents=True)
    SqliteHubStore(workdir / "hub" / "hub.db", schema, create=True).close()  # its schema
    hub = Hub(workdir / "hub", names, everything=False)  # each office: its own name's scope
    offices: list[Office] = []
    rows = case_rows(k * rounds * CHANGES, seed)
    try:
        for name in names:
            path = workdir / f"{name}.db"
            store = NodeStore.init(path, name, hub.url, hub.tokens[name], schema)
            client = HttpHubClient(hub.url, hub.tokens[name], node=name, timeout_seconds=timeout)
            offices.append(Office(name, path, SyncAgent(store, client)))
        per_round = []
        with hub.blamed(f"a sync ({kind} hub, K = {k})"):
            for _ in range(rounds):
                for office in offices:
                    insert_cases(office, rows)
                done = sync_round(hub, offices)
                if done["pushed"] != k * CHANGES:
                    raise BenchError(f"the offices pushed {done['pushed']}, not {k * CHANGES}")
                per_round.append(done)
            for office in offices:  # catch up (not measured): each office pulls what it lacks
                office.agent.sync_once()
        check_holdings(kind, k, rounds, offices)
    finally:
        for office in offices:
            office.close()
        hub.stop()
    return {"kind": kind, "k": k, "rounds": per_round, **summary(per_round[1:])}


def check_holdings(kind: str, k: int, rounds: int, offices: Sequence[Office]) -> None:
    own_expected = rounds * CHANGES
    total_expected = own_expected if kind == "scoped" else k * own_expected
    for office in offices:
        total, own = count_cases(office)
        if total != total_expected or own != own_expected:
            raise BenchError(
                f"{kind} hub, K = {k}: {office.name} holds {total} cases ({own} its own), "
                f"expected {total_expected} ({own_expected} its own)"
            )


def summary(per_round: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-sync figures over the given rounds."""
    syncs = sum(r["syncs"] for r in per_round)
    return {
        "pulled": sum(r["pulled"] for r in per_round) / syncs,
        "hub_cpu_ms": 1000 * sum(r["hub_cpu_s"] for r in per_round) / syncs,
        "wall_ms": 1000 * sum(r["wall_s"] for r in per_round) / syncs,
    }


# -- report -----------------------------------------------------------------------


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each figure's median, min and max over the repetitions."""
    out = {}
    for key in FIGURES:
        values = [run[key] for run in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def markdown(table: dict[int, dict[str, dict[str, dict[str, float]]]], repeat: int) -> str:
    lines = [
        "| K offices | hub | " + " | ".join(FIGURES.values()) + " |",
        "|---:|---|" + "---:|" * len(FIGURES),
    ]
    for k, kinds in table.items():
        for kind, figures in kinds.items():
            cells = []
            for key in FIGURES:
                fig = figures[key]
                digits = 0 if key == "pulled" else 1
                cell = f"{fig['median']:,.{digits}f}"
                if repeat > 1:
                    cell += f" ({fig['min']:,.{digits}f}–{fig['max']:,.{digits}f})"
                cells.append(cell)
            lines.append(f"| {k} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(table: dict[int, dict[str, dict[str, dict[str, float]]]]) -> dict[int, dict[str, Any]]:
    """scoped ÷ unscoped, of the medians, per K (None where the unscoped figure is 0)."""
    out: dict[int, dict[str, Any]] = {}
    for k, kinds in table.items():
        out[k] = {}
        for key in FIGURES:
            base = kinds["unscoped"][key]["median"]
            out[k][key] = kinds["scoped"][key]["median"] / base if base else None
    return out


# -- command line -----------------------------------------------------------------


def offices_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("each K must be at least 2")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark what sync scopes save as offices multiply: records pulled, "
        "hub CPU and wall time per sync, an unscoped and a scoped hub in the same run.",
    )
    parser.add_argument(
        "--offices", type=offices_list, default=[20, 100], help="K values (default 20,100)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds (default 4; figures from round 2 on)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--seed", type=int, default=2024, help="random seed of the case rows")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--tmpdir", help="where to put the temporary databases (default: $TMPDIR)")
    parser.add_argument(
        "--timeout", type=float, default=60, help="seconds allowed per HTTP request (default 60)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.repeat < 1 or args.timeout <= 0:
        parser.error("--rounds must be >= 2, --repeat >= 1, --timeout > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    command = shlex.join(sys.orig_argv)
    info = machine()
    load_before = os.getloadavg()[0]
    progress(f"fieldsync scopes benchmark: {command}")
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fieldsync-scopes-", dir=args.tmpdir) as tmp:
            for i in range(args.repeat):
                for k in args.offices:
                    kinds = KINDS if i % 2 == 0 else KINDS[::-1]
                    for kind in kinds:
                        workdir = Path(tmp) / f"{i + 1}-{k}-{kind}"
                        started = time.perf_counter()
                        run = hub_run(kind, k, args.rounds, workdir, args.timeout, args.seed + i)
                        shutil.rmtree(workdir)
                        runs.append({"repeat": i + 1, **run})
                        progress(
                            f"{i + 1}/{args.repeat} K={k} {kind}: pulled {run['pulled']:.0f}, "
                            f"hub CPU {run['hub_cpu_ms']:.1f} ms, wall {run['wall_ms']:.1f} ms "
                            f"per sync ({time.perf_counter() - started:.0f} s)"
                        )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    table = {
        k: {kind: medians([r for r in runs if r["k"] == k and r["kind"] == kind]) for kind in KINDS}
        for k in args.offices
    }
    seconds = time.perf_counter() - began
    info["load_average_1min"] = [load_before, os.getloadavg()[0]]
    if args.json:
        results = {
            "command": command,
            "machine": info,
            "config": vars(args),
            "figures": table,
            "ratios_scoped_to_unscoped": ratios(table),
            "runs": runs,
            "seconds": seconds,
        }
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    print(f"# fieldsync scopes benchmark, {datetime.now(UTC).isoformat(timespec='seconds')}\n")
    print(f"- command: `{command}`")
    print(
        f"- machine: {info['cpus']} CPUs ({info['cpu_model'] or 'unknown model'}), "
        f"{info['memory']} RAM, {info['platform']}; 1-min load average "
        f"{load_before:.2f} at start, {info['load_average_1min'][1]:.2f} at end"
    )
    print(
        f"- python {info['python']}, SQLite {info['sqlite']}, "
        f"fieldsync code {info['fieldsync_code']}"
    )
    print(
        f"- K offices, each round each inserts {CHANGES} cases of its own then all sync one "
        f"after the other; {args.rounds} rounds, figures over rounds 2-{args.rounds}; median "
        f"of {args.repeat} (min–max); hub: `fieldsync hub serve` subprocess on 127.0.0.1\n"
    )
    print(markdown(table, args.repeat))
    print("\nScoped ÷ unscoped (medians):\n")
    for k, by_key in ratios(table).items():
        parts = ", ".join(
            f"{FIGURES[key].replace(' per sync', '')} "
            + ("—" if value is None else f"{value:.2f}×")
            for key, value in by_key.items()
        )
        print(f"- K = {k}: {parts}")
    print(f"\nTook {seconds:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
