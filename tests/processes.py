"""``fieldsync hub serve`` as a child process (with its workers), for the tests that kill it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

FIELDSYNC = Path(sys.executable).parent / "fieldsync"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HubProcess:
    """``fieldsync hub serve`` as a child process, on a fixed loopback port.

    It runs in a process group of its own, so that killing it kills its workers too
    (``--workers N``), as a machine that dies would.
    """

    def __init__(self, db: str | Path, log: Path, *, workers: int = 1) -> None:
        self.db, self.log, self.port, self.workers = str(db), log, free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        """Start and wait for /v1/health; raise RuntimeError when it does not come up."""
        command = [str(FIELDSYNC), "hub", "serve", "--db", self.db, "--port", str(self.port)]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"the hub exited at start:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    if len(self.worker_pids()) >= self.workers or self.workers == 1:
                        return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the hub did not come up in 30 s:\n{self.log.read_text()[-3000:]}")

    def worker_pids(self) -> list[int]:
        """The worker processes serving (``--workers``): the children of the hub's
        process that are not uvicorn's helpers."""
        assert self.proc is not None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                state, parent = stat.rsplit(")", 1)[1].split()[:2]
                command = (entry / "cmdline").read_bytes()
                alive = state not in ("Z", "X")  # a killed one, not yet reaped
                if int(parent) == self.proc.pid and alive and b"resource_tracker" not in command:
                    found.append(int(entry.name))
        return sorted(found)

    def busy_worker_pids(self) -> list[int]:
        """The workers holding a client's connection open at this moment: serving a
        request (a client that sends one request per connection, as tests/proxy.py
        does towards the hub)."""
        port = f":{self.port:04X}"
        held = set()  # inodes of established connections to the hub's port
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(port) and fields[3] == "01":  # ESTABLISHED
                        held.add(f"socket:[{fields[9]}]")
        busy = []
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                fds = Path(f"/proc/{pid}/fd").iterdir()
                if any(os.readlink(fd) in held for fd in fds):
                    busy.append(pid)
        return busy

    def log_problems(self) -> list[str]:
        """Lines of the hub's log that say it failed a request: a traceback, a 500."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if "Traceback" in line or '" 500 ' in line]

    def kill(self) -> None:
        """SIGKILL to the hub and its workers: no clean shutdown, whatever they were doing."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        self.kills += 1

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # a worker left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
