"""
How long a sync holds the office database's write lock: the longest write transaction.

While a transaction holds the write lock, any other program writing to the office
database (a clerk's tool, the application) waits, or fails with "database is locked"
if it does not wait (the ``sqlite3`` shell without ``.timeout``). This measures, at
both ends of a sync, every write transaction the office's code opens
(``shared.sqlite.write``: ``BEGIN IMMEDIATE`` … ``COMMIT``), by where it was opened:

- office A (astana) pushes N new cases (the batches acknowledged:
  ``Outbox.mark_acked``, and the bookkeeping around them);
- office B (almaty) pulls them (the pages applied: ``inbox.apply_page``).

The hub is a real ``fieldsync hub serve`` subprocess on 127.0.0.1 (bench/bench.py's
``Hub``); the offices are ``SyncAgent``s with the default batch and page sizes, built as
``fieldsync node sync`` builds them. The N rows are inserted before the clock starts
(not part of any sync). Each figure is the median of ``--repeat`` repetitions; the
target is the longest transaction under 100 ms.

Run ``.venv/bin/python bench/locks.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import node
import shared.sqlite
from bench import OFFICE_A, OFFICE_B, Hub, agent_for, case_rows, close_agent, fill, progress
from node.store import NodeStore

TARGET_MS = 100.0
_WRITE = shared.sqlite.write


class Timings:
    """Every write transaction of the office code while installed: (where, seconds)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float]] = []
        self._patched: list[Any] = []

    @contextlib.contextmanager
    def _timed_write(self, db: Any) -> Iterator[Any]:
        where = sys._getframe(2).f_code.co_qualname  # the function that opened it
        started = time.perf_counter()
        with _WRITE(db) as conn:  # BEGIN IMMEDIATE (the lock) … COMMIT (its release)
            yield conn
        self.spans.append((where, time.perf_counter() - started))

    def __enter__(self) -> Timings:
        # Each node module imports ``write`` by name: replace it where it is used.
        for module in list(sys.modules.values()):
            name = getattr(module, "__name__", "")
            if name.startswith(f"{node.__name__}.") and getattr(module, "write", None) is _WRITE:
                module.write = self._timed_write  # type: ignore[attr-defined]
                self._patched.append(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self._patched:
            module.write = _WRITE

    def longest(self) -> dict[str, float]:
        """The longest transaction per place, in ms."""
        out: dict[str, float] = {}
        for where, seconds in self.spans:
            out[where] = max(out.get(where, 0.0), seconds * 1000)
        return out


def _probe(path: str, stop: Any, answer: Any) -> None:
    """Another writer, in a process of its own: take the write lock (``BEGIN IMMEDIATE``,
    no busy timeout, retried every 0.2 ms while locked) and let it go, every
    millisecond, until ``stop``; answer the longest wait (ms) and how many attempts
    met the lock (each one a "database is locked" to a program that does not wait)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    longest, locked, attempts = 0.0, 0, 0
    while not stop.is_set():
        started = time.perf_counter()
        attempts += 1
        first = True
        while not stop.is_set():
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                break
            except sqlite3.OperationalError:  # database is locked
                locked += first
                first = False
                time.sleep(0.0002)
        longest = max(longest, (time.perf_counter() - started) * 1000)
        time.sleep(0.001)
    conn.close()
    answer.send((longest, locked, attempts))


@contextlib.contextmanager
def probed(path: Path) -> Iterator[dict[str, float]]:
    """Run :func:`_probe` on ``path`` for the block; its answer lands in the dict."""
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    mine, theirs = context.Pipe()
    process = context.Process(target=_probe, args=(str(path), stop, theirs), daemon=True)
    process.start()
    out: dict[str, float] = {}
    try:
        time.sleep(0.05)
        yield out
    finally:
        stop.set()
        if mine.poll(30):
            out["wait_ms"], out["locked"], out["attempts"] = mine.recv()
        process.join(5)


def one_run(n: int, seed: int, workdir: Path) -> dict[str, Any]:
    workdir.mkdir()
    hub = Hub(workdir / "hub", (OFFICE_A, OFFICE_B))
    try:
        paths = {name: workdir / f"{name}.db" for name in (OFFICE_A, OFFICE_B)}
        for name, path in paths.items():
            NodeStore.init(path, name, hub.url, hub.tokens[name]).close()
        fill(paths[OFFICE_A], case_rows(n, seed))
        agent_a, agent_b = agent_for(paths[OFFICE_A]), agent_for(paths[OFFICE_B])
        try:
            gc.collect()
            with probed(paths[OFFICE_A]) as probe_a, Timings() as push:
                report_a = agent_a.sync_once()
            gc.collect()
            with probed(paths[OFFICE_B]) as probe_b, Timings() as pull:
                report_b = agent_b.sync_once()
        finally:
            close_agent(agent_a)
            close_agent(agent_b)
    finally:
        hub.stop()
    if report_a.pushed != n or report_b.pulled != n:
        raise SystemExit(f"A pushed {report_a.pushed} and B pulled {report_b.pulled}, not {n}")
    places = {f"push: {k}": v for k, v in push.longest().items()}
    places |= {f"pull: {k}": v for k, v in pull.longest().items()}
    return {
        "longest_ms": max(places.values()),
        "waited_ms": max(probe_a["wait_ms"], probe_b["wait_ms"]),
        "probe": {"push": probe_a, "pull": probe_b},
        "places": places,
        "transactions": {"push": len(push.spans), "pull": len(pull.spans)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--changes", type=int, default=100_000, help="N (default 100,000)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--seed", type=int, default=2024, help="random seed of the case rows")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tmpdir", help="where to put the temporary databases")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="fieldsync-locks-", dir=args.tmpdir))
    try:
        runs = []
        for i in range(args.repeat):
            progress(f"run {i + 1}/{args.repeat}: N={args.changes:,}")
            runs.append(one_run(args.changes, args.seed, root / f"run{i}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    places = sorted({p for run in runs for p in run["places"]})
    medians = {p: statistics.median(r["places"].get(p, 0.0) for r in runs) for p in places}
    longest = [r["longest_ms"] for r in runs]
    load = (load_at_start, os.getloadavg()[0])
    if args.json:
        print(
            json.dumps(
                {"runs": runs, "median_ms": medians, "longest_ms": longest, "load": load},
                indent=2,
            )
        )
    else:
        print(
            f"code: {Path(node.__file__).parent.parent}; "
            f"load average {load[0]:.2f} -> {load[1]:.2f}"
        )
        print(f"N = {args.changes:,}, {args.repeat} runs; longest write transaction, ms")
        print("| where | median | min-max |")
        print("| --- | ---: | ---: |")
        for p in sorted(places, key=lambda p: -medians[p]):
            values = [r["places"].get(p, 0.0) for r in runs]
            print(f"| {p} | {medians[p]:.1f} | {min(values):.1f}-{max(values):.1f} |")
        waits = [r["waited_ms"] for r in runs]
        w = statistics.median(waits)
        print(
            f"| another writer's longest wait (probe) | {w:.1f} | "
            f"{min(waits):.1f}-{max(waits):.1f} |"
        )
        m = statistics.median(longest)
        verdict = "PASS" if w < TARGET_MS else "FAIL"
        print(
            f"| **longest of all** | **{m:.1f}** | {min(longest):.1f}-{max(longest):.1f} |"
            f"\n\nanother writer's longest wait, target < {TARGET_MS:.0f} ms: {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
