"""Schemathesis against a real hub: every operation of its OpenAPI document
(``/v1/openapi.json``), with positive and negative data, signed in as an office, an
admin and a dashboard session.

The hub holds real records first (two offices' cases, a field conflict, a change set
aside), so that operations reach past "not found". Schemathesis runs as its command
line does, in a process of its own, against the hub served by uvicorn on 127.0.0.1.
It passes when no answer is a 5xx and every answer is as the document says (status
code, media type, headers, body schema).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Hub, Office
from tests.integration.test_dashboard import add_case, make_conflict, sign_in, sync_all

pytestmark = pytest.mark.integration

CASES_PER_OPERATION = 100
NO_INPUT = {"GET /v1/health", "GET /v1/openapi.json"}
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def _schemathesis() -> str:
    found = Path(sys.executable).parent / "schemathesis"
    if not found.exists():
        pytest.fail("schemathesis is not installed: run `make install` (the dev extra)")
    return str(found)


def test_schemathesis_finds_no_5xx_and_no_answer_off_the_document(
    hub: Hub, make_office: Callable[..., Office], tmp_path: Path
) -> None:
    astana, almaty = make_office("astana"), make_office("almaty")
    add_case(astana, "c1")
    add_case(almaty, "c2", family_name="=1+1")
    sync_all(astana, almaty)
    make_conflict(hub, (astana, almaty), "family_name", ("Ali", "Bek"))
    office_token = hub.store.add_node("bishkek")
    admin_token = hub.store.add_admin("fuzz", "owner")
    with httpx.Client(base_url=hub.url, timeout=30) as web:
        # a change to a table the hub does not have: set aside, listed on pages
        unknown = {"seq": 1, "table": "nope", "pk": {"id": 1}, "op": "delete", "ts": 1 << 40}
        auth = {"Authorization": f"Bearer {office_token}"}
        pushed = web.post("/v1/push", json={"protocol": 2, "changes": [unknown]}, headers=auth)
        assert pushed.status_code == 200, pushed.text
        assert sign_in(web, admin_token).status_code == 303
        session = web.cookies["fieldsync_session"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f'[auth.openapi.office]\nbearer = "{office_token}"\n'
        f'[auth.openapi.admin]\nbearer = "{admin_token}"\n'
        f'[auth.openapi.session]\napi_key = "{session}"\n'
    )
    command = [
        _schemathesis(),
        "--config-file",
        str(config),
        "run",
        f"{hub.url}/v1/openapi.json",
        "--max-examples",
        str(CASES_PER_OPERATION),
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--checks",
        ",".join(CHECKS),
        "--workers",
        "1",
        "--seed",
        "20261203",
        "--no-shrink",
        "--request-timeout",
        "30",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(tmp_path / "events.ndjson"),
    ]
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    assert done.returncode == 0, output[-20_000:]
    selected = re.search(r"Selected:\s+(\d+)/(\d+)", output)
    tested = re.search(r"Tested:\s+(\d+)", output)
    cases = re.search(r"(\d+) generated", output)
    assert selected and tested and cases, output[-5000:]
    assert tested.group(1) == selected.group(1) == selected.group(2)
    generated = cases_per_operation(tmp_path / "events.ndjson")
    assert len(generated) == int(tested.group(1))
    # Only an operation that takes nothing (no parameter, no body) can run out of cases.
    assert {op for op, n in generated.items() if n < CASES_PER_OPERATION} <= NO_INPUT, generated
    print(
        f"schemathesis: {cases.group(1)} cases, {tested.group(1)} operations, {took:.0f} s;",
        ", ".join(f"{op} {n}" for op, n in sorted(generated.items())),
    )


def cases_per_operation(events: Path) -> dict[str, int]:
    """Cases generated per operation (positive and negative), from the NDJSON report."""
    counts: Counter[str] = Counter()
    with events.open() as lines:
        for line in lines:
            finished = json.loads(line).get("ScenarioFinished")
            if finished is None:
                continue
            recorder = finished["recorder"]
            counts[recorder["label"]] += sum(
                1 for case in recorder.get("cases", {}).values() if "parent_id" not in case
            )
    return dict(counts)
