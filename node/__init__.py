"""The fieldsync node: an office's own SQLite database, its change log and sync agent."""
