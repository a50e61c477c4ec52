"""Named SQL queries kept in ``store/sql/*.sql`` as ``-- name: <query_name>`` blocks (procrastinate style).

Keeping SQL in SQL files lets it be read, linted and explained as SQL; Python refers to it by name.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split one file into ``{name: sql}``; a comment line after the name is kept as documentation."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        queries[name] = body.strip()
    return queries


@cache
def all_queries() -> dict[str, str]:
    """Every named query of every ``.sql`` file in the package's ``sql`` folder."""
    queries: dict[str, str] = {}
    for entry in sorted(resources.files("certsync.store").joinpath("sql").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".sql"):
            for name, sql in parse_queries(entry.read_text(encoding="utf-8")).items():
                if name in queries:
                    raise ValueError(f"duplicate query name {name!r} in {entry.name}")
                queries[name] = sql
    return queries


def query(name: str) -> str:
    """The SQL text of one named query; KeyError names the missing query."""
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no SQL query named {name!r} in certsync/store/sql") from None
