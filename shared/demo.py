"""`fieldsync demo`: two offices and a hub on one machine (filled in below)."""

from __future__ import annotations

from collections.abc import Callable


def run_demo(echo: Callable[[str], None], keep_dir: str | None = None) -> None:
    """Run the demo, printing what happens through ``echo``."""
    raise NotImplementedError("the demo is not written yet")
