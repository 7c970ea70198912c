"""
The fieldsync program: the one command line and the demo, above ``node`` and ``hub``.

Layers, checked by ``make check`` (import-linter, see pyproject.toml)::

    fieldsync   the CLI and the demo: uses node and hub
    node  hub   the office side, the hub side: never import each other
    shared      wire types, clock, merge rule, schema, SQLite helpers: imports neither

The CLI is one program with one way of reporting errors, and the demo runs both
sides in one process, so they sit above both sides rather than inside either.
"""
