"""Code common to the fieldsync node and hub: wire types, clock, merge rule, CLI."""

from __future__ import annotations

__version__ = "0.1.0"
