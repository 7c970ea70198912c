"""The hub on PostgreSQL: its connection, its own tables and the mirrored tables."""
