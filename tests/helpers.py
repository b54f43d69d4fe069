"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from atlas_distill.db import connect


def db_ids(url: str, where: str = "true", params: tuple = ()) -> list[int]:
    """Session ids matching a hand-written SQL condition: the oracle the filters are checked against."""
    with connect(url) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM sessions s WHERE {where} ORDER BY id", params)]
