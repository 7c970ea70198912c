"""Code common to the fieldsync node and hub: wire types, clock, merge rule, schema.

It imports neither ``node`` nor ``hub`` (checked by ``make check``).
"""

from __future__ import annotations

__version__ = "0.1.0"
