"""Custom merge functions that test schemas name (policy = "custom:tests.custom_merge:…")."""

from __future__ import annotations

from typing import Any

from shared.merge import MergeRequest


def larger_household(request: MergeRequest) -> dict[str, Any]:
    """Keep the larger household size; join both notes; otherwise the incoming values."""
    merged = {**request.current, **request.incoming}
    if "household_size" in request.columns:
        sizes = [request.current.get("household_size"), request.incoming.get("household_size")]
        merged["household_size"] = max(s for s in sizes if s is not None)
    if "notes" in request.columns:
        notes = sorted({request.current.get("notes") or "", request.incoming.get("notes") or ""})
        merged["notes"] = " | ".join(n for n in notes if n)
    return merged


def broken(request: MergeRequest) -> dict[str, Any]:
    """A merge function with a bug."""
    raise RuntimeError("boom")


def wrong_type(request: MergeRequest) -> dict[str, Any]:
    """A merge function that returns a value the column cannot hold."""
    return {**request.current, "household_size": "many"}
