"""Create the Atlas schema and fill it with synthetic sessions, by COPY, in batches."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any

from ..db import connect, mask_url, query_error
from ..errors import UsageError
from .synthetic import SyntheticSession, generate_sessions

_SESSION_COLUMNS = ("id", "task", "status", "metadata", "final_answer", "reward", "reward_stats", "reward_audit",
                    "student_learning", "teacher_learning", "review_status", "review_notes", "created_at",
                    "completed_at")
_JSON_COLUMNS = {"metadata", "reward", "reward_stats", "reward_audit"}


@dataclass
class SeedResult:
    sessions: int
    steps: int
    events: int
    first_id: int
    last_id: int


def create_schema(conn) -> None:
    conn.execute(resources.files("atlas_distill.traces").joinpath("schema.sql").read_text())


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def seed_database(url: str, count: int, *, seed: int = 0, append: bool = False, batch: int = 1000,
                  progress: Callable[[int, int], None] | None = None) -> SeedResult:
    """Insert `count` synthetic sessions; refuses a non-empty store unless append=True."""
    import psycopg

    with connect(url) as conn:
        try:
            create_schema(conn)
            existing, max_id = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM sessions").fetchone()
            if existing and not append:
                raise UsageError(
                    f"The database at {mask_url(url)} already holds {existing} sessions.",
                    fix="Pass --append to add synthetic sessions beside them, or use an empty database.",
                )
            result = SeedResult(0, 0, 0, max_id + 1, max_id)
            pending: list[SyntheticSession] = []
            for session in generate_sessions(count, seed=seed + max_id):
                pending.append(session)
                if len(pending) == batch:
                    _copy_batch(conn, pending, result)
                    pending = []
                    if progress:
                        progress(result.sessions, count)
            _copy_batch(conn, pending, result)
            conn.execute("SELECT setval(pg_get_serial_sequence('sessions', 'id'), %s)", (max(result.last_id, 1),))
            conn.commit()
        except psycopg.Error as exc:
            raise query_error(exc, url) from None
    if progress:
        progress(result.sessions, count)
    return result


def _copy_batch(conn, sessions: list[SyntheticSession], result: SeedResult) -> None:
    if not sessions:
        return
    ids = range(result.last_id + 1, result.last_id + 1 + len(sessions))
    with conn.cursor() as cur:
        with cur.copy(f"COPY sessions ({', '.join(_SESSION_COLUMNS)}) FROM STDIN") as copy:
            for sid, s in zip(ids, sessions, strict=True):
                copy.write_row([sid] + [_json(s.row[c]) if c in _JSON_COLUMNS else s.row[c]
                                        for c in _SESSION_COLUMNS[1:]])
        with cur.copy("COPY plans (session_id, plan) FROM STDIN") as copy:
            for sid, s in zip(ids, sessions, strict=True):
                copy.write_row([sid, _json(s.plan)])
        with cur.copy("COPY step_results (session_id, step_id, trace, output, evaluation, attempts, metadata) "
                      "FROM STDIN") as copy:
            for sid, s in zip(ids, sessions, strict=True):
                for st in s.steps:
                    copy.write_row([sid, st["step_id"], st["trace"], st["output"], _json(st["evaluation"]),
                                    st["attempts"], _json(st["metadata"])])
                    result.steps += 1
        with cur.copy("COPY step_attempts (session_id, step_id, attempt, evaluation) FROM STDIN") as copy:
            for sid, s in zip(ids, sessions, strict=True):
                for a in s.attempts:
                    copy.write_row([sid, a["step_id"], a["attempt"], _json(a["evaluation"])])
        with cur.copy("COPY guidance_notes (session_id, step_id, sequence, note) FROM STDIN") as copy:
            for sid, s in zip(ids, sessions, strict=True):
                for g in s.guidance:
                    copy.write_row([sid, g["step_id"], g["sequence"], g["note"]])
        with cur.copy("COPY trajectory_events (session_id, event, created_at) FROM STDIN") as copy:
            for sid, s in zip(ids, sessions, strict=True):
                for offset, event in enumerate(s.events):
                    copy.write_row([sid, _json(event), s.row["created_at"] + timedelta(seconds=offset)])
                    result.events += 1
    result.sessions += len(sessions)
    result.last_id = ids[-1]
