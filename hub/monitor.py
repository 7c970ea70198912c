"""
Where the names of the former office-monitoring module live now, for their importers
(the dashboard, the admin API, the CLI): admins and sessions in hub/auth.py, office
status in hub/status.py and hub/health.py, times in hub/times.py.
"""

from __future__ import annotations

from hub.auth import SESSION_HOURS, hash_token
from hub.health import HEALTH_STATES, OfficeStatus, health
from hub.times import ago, stamp_time, utcnow

__all__ = [
    "HEALTH_STATES",
    "SESSION_HOURS",
    "OfficeStatus",
    "ago",
    "hash_token",
    "health",
    "stamp_time",
    "utcnow",
]
